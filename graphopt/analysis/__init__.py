"""Analyses of a captured program used by lossy passes (pruning): channel coupling,
dependency groups and importance scores. They read the program and change nothing."""

from graphopt.analysis.channels import ChannelGraph, Space, build_channel_graph
from graphopt.analysis.groups import (
    DependencyAnalysis,
    Group,
    Member,
    analyse,
    dependency_groups,
)

__all__ = ["ChannelGraph", "DependencyAnalysis", "Group", "Member", "Space", "analyse", "build_channel_graph", "dependency_groups"]
