"""faiss single-query search time at 100k x 256-d: flat inner product vs HNSW, by OpenMP thread count.

    python benchmarks/faiss_threads.py
"""
import time, numpy as np, faiss
rng = np.random.default_rng(0)
x = rng.standard_normal((100_000, 256)).astype(np.float32); x /= np.linalg.norm(x, axis=1, keepdims=True)
for threads in (16, 4, 1):
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(256); index.add(x)
    q = x[:200] + 0.01
    times = []
    for i in range(200):
        t = time.perf_counter(); index.search(q[i:i+1], 5); times.append((time.perf_counter() - t) * 1e3)
    h = faiss.IndexHNSWFlat(256, 32, faiss.METRIC_INNER_PRODUCT); t=time.perf_counter(); h.add(x); build=time.perf_counter()-t
    th = []
    for i in range(200):
        t = time.perf_counter(); h.search(q[i:i+1], 5); th.append((time.perf_counter() - t) * 1e3)
    print(f"threads {threads}: flat p50 {np.percentile(times,50):.2f} p90 {np.percentile(times,90):.2f} ms; hnsw p50 {np.percentile(th,50):.3f} ms (build {build:.1f}s)")
