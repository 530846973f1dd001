"""Zero-argument model factories for `graphopt optimize --model factories:NAME` in tests."""

from graphopt import zoo


def tiny_bert():
    return zoo.tiny_model("bert"), zoo.example_inputs("bert")


def tiny_gpt2():
    return zoo.tiny_model("gpt2"), zoo.example_inputs("gpt2")
