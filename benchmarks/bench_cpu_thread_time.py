"""Single-thread CPU time (time.thread_time, best of 3) of the CPU kernel vs torch.compile(reference).

    python benchmarks/bench_cpu_thread_time.py 1048576x10,131072x100,16384x1000 --compiled

Thread CPU time is far less sensitive than wall time to other processes on a shared machine, so
ratios from it are usable when the machine is loaded.  Columns: rk.score, rk.select (k = 10%),
torch.topk on the scores, logits.sum(), rk.score on column-major logits, compiled reference score.
"""
# single-thread CPU time (robust to a loaded machine): ms per call
import sys, time, torch, rho_kernels as rk
torch.set_num_threads(1)
def t(f, r=3):
    f(); best=1e9
    for _ in range(r):
        a=time.thread_time(); f(); best=min(best, time.thread_time()-a)
    return best*1e3
shapes=[(1048576,10),(131072,100),(16384,1000),(8192,32000)] if len(sys.argv)<2 else [tuple(map(int,s.split('x'))) for s in sys.argv[1].split(',')]
comp = '--compiled' in sys.argv
for n,v in shapes:
    for dt in [torch.float32, torch.bfloat16]:
        g=torch.Generator().manual_seed(0)
        x=(torch.randn(n,v,generator=g)*3).to(dt); y=torch.randint(0,v,(n,),generator=g); il=torch.rand(n,generator=g)
        k=n//10
        s=rk.score(x,y,il,backend="cpu")
        xt=x.t().contiguous().t()
        line=f"{n}x{v} {str(dt)[6:]:8s} score {t(lambda: rk.score(x,y,il,backend='cpu')):8.2f} select {t(lambda: rk.select(x,y,il,k,backend='cpu')):8.2f} topk {t(lambda: torch.topk(s,k)):7.2f} sum {t(lambda: x.sum()):7.2f} T-score {t(lambda: rk.score(xt,y,il,backend='cpu'),1):8.2f}"
        if comp:
            f=torch.compile(lambda a,b,c: rk.score(a,b,c,backend='reference'), dynamic=False)
            line+=f" compiled {t(lambda: f(x,y,il)):8.2f}"
        print(line, flush=True)
