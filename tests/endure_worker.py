"""A minimal data-parallel worker for the endure tests (run by the supervisor, one per rank).

Not the trainer: a few lines of weighted DP so checkpoint/resume/kill can be tested on their own.
Args: CKPT_DIR PLAN_JSON STEPS SAVE_EVERY RESUME(0/1) LOSSES_OUT [SLEEP_S]
Writes one line "step loss" per completed step to LOSSES_OUT.<rank>.
"""

import sys
import time

import torch
import torch.distributed as dist

from chipfuse.data import get_batch
from chipfuse.model.gpt import build_model, loss_sum
from chipfuse.plan.plan import Plan
from chipfuse.runtime.endure import checkpoint
from chipfuse.runtime.launch import dist as cdist


def main() -> None:
    ckpt, plan_path, steps, every, resume, out = sys.argv[1:7]
    sleep_s = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    info = cdist.init(timeout_s=20)
    plan = Plan.from_json(plan_path)
    model = build_model(plan.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = 0
    if resume == "1":
        r = checkpoint.load(ckpt, model=model, optimizer=opt)
        checkpoint.check_resumable(r.plan, plan, str(r.path))
        start = r.step
    shares = [r.batch_share for r in plan.replicas]
    first = sum(shares[: info.rank])
    G, T = plan.global_batch, plan.seq_len
    with open(f"{out}.{info.rank}", "a") as f:
        for step in range(start, int(steps)):
            x, y = get_batch(step, G, T, first, shares[info.rank])
            loss = loss_sum(model(x), y) / (G * T)
            opt.zero_grad()
            loss.backward()
            lt = loss.detach().clone()
            if info.distributed:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                dist.all_reduce(lt)
            opt.step()
            f.write(f"{step} {lt.item():.8f} {time.time():.3f}\n")
            f.flush()
            if int(every) and (step + 1) % int(every) == 0:
                checkpoint.save(ckpt, step=step + 1, model=model, optimizer=opt, plan=plan.to_dict())
            time.sleep(sleep_s)
    cdist.shutdown(0)


if __name__ == "__main__":
    main()
