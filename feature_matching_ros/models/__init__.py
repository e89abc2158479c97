"""Model definitions written here where no installable library ships them (SANDESC, Efficient LoFTR)."""
