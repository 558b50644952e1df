"""Galvatron's planner (Miao et al., VLDB 2023): the fastest per-layer mix of data, sharded data,
tensor and pipeline parallelism and checkpointing that fits the GPUs' memory, found by dynamic
programming over a cost model. Arithmetic only: it imports no torch (docs/galvatron.md)."""

from burrow.parallel.planner.costmodel import LayerCost, Step, Strategy, layer_cost
from burrow.parallel.planner.hardware import HARDWARE, CostInputs, Hardware, get_hardware
from burrow.parallel.planner.layers import LayerShape, model_layers
from burrow.parallel.planner.plan import LayerPlan, Plan, model_fingerprint
from burrow.parallel.planner.search import Outcome, SearchResult, search
from burrow.parallel.planner.stages import Job

__all__ = ["HARDWARE", "CostInputs", "Hardware", "Job", "LayerCost", "LayerPlan", "LayerShape",
           "Outcome", "Plan", "SearchResult", "Step", "Strategy", "get_hardware", "layer_cost",
           "model_fingerprint", "model_layers", "search"]
