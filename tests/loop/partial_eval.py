"""A loop whose rank 1 alone evaluates at step 3: the job must say so, not hang."""

import torch
from torch.utils.data import TensorDataset

import elastic

job = elastic.init()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = job.optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
for x, y in job.loader(data, global_batch_size=8, epochs=4):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    if job.step == 3 and job.rank == 1:
        job.evaluate(model, data, lambda m, b: {"loss": (m(b[0]) - b[1]).pow(2).sum()})
raise SystemExit(job.exit_code)
