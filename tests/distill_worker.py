"""Run one distillation of a tiny BERT, alone or as one rank under torchrun; save the student.

Used by test_distill.py to check that 2 processes take the same steps as 1 process with the
same global batch.
"""

import os
import sys

import torch

import graphopt
from graphopt import zoo
from graphopt.distill import DistillConfig, distill
from graphopt.inputs import random_inputs


def perturbed_pair():
    teacher = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    student = teacher.clone()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.module.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return teacher, student


def tensor_data(program, batches=4, batch=8, seq=12):
    generator = torch.Generator().manual_seed(0)
    return [random_inputs(program, {"batch": batch, "seq": seq}, generator)[1] for _ in range(batches)]


def main(out_path: str, steps: int = 6) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    teacher, student = perturbed_pair()
    config = DistillConfig(steps=steps, lr=1e-3, warmup=0.0, progress=False, batch_size=8)
    result = distill(student, teacher, tensor_data(teacher), config)
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in student.module.named_parameters()}
        save_file(tensors, out_path, metadata={"world_size": str(result.world_size), "steps": str(result.steps)})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
