"""Model-actor sizing: `resources` of a job (numbers or `auto`) + what the cluster has -> actor numbers.

Pure (no Ray): the run hands it the cluster's nodes (`cluster_from_ray_nodes(ray.nodes())`), the dry run
this machine as a local Ray would see it (`local_machine`), and the unit tests hand-made clusters.

The rules, `auto` first:
  * num_gpus_per_actor auto: 1 if the cluster has a GPU and model.device is not 'cpu', else 0.
  * max_actors auto: GPU actors: one per GPU (as many actors as the nodes' GPUs hold); CPU actors: one
    (torch spreads one model over the actor's CPUs with threads; another actor would be another model copy).
    Never below min_actors.
  * num_cpus_per_actor auto: GPU actors: 1 CPU each. CPU actors: the whole CPUs the cluster has minus one
    (capped at the largest node), shared by the actors. Either way one CPU stays free for the read
    (READ_TASK_CPUS) and write (WRITE_TASK_CPUS) tasks; on a cluster too small for that, the actors share
    what is left after one read and one write task (a fraction of a CPU each).
Then every request, auto or not, must be one the cluster can satisfy, or `ResourceError` says why in
one line (Ray itself would wait forever):
  * a GPU per actor needs a node with that many GPUs; model.device 'cuda' needs a GPU at all;
  * the CPUs per actor must fit on one node;
  * min_actors must fit on the nodes at once (the run waits for them before any read starts);
  * the actors that can be placed (up to max_actors) must leave READ_TASK_CPUS + WRITE_TASK_CPUS free
    for one read and one write task, or the pipeline never gets its data to them (the 2-CPU hang).
These are checked against the nodes the cluster has now: a cluster that adds nodes on demand (an
autoscaler) is judged by what it has when the job starts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional

from schemas.job import ResourcesSpec

READ_TASK_CPUS = 0.5  # logical CPUs of one read/decode task (pipeline.run)
WRITE_TASK_CPUS = 0.25  # logical CPUs of one write task
READ_WRITE_CPUS = READ_TASK_CPUS + WRITE_TASK_CPUS  # what must stay free so data can flow at all
FREE_CPUS_AUTO = 1.0  # what `auto` leaves free for the read/write tasks when the cluster allows
_EPS = 1e-9


class ResourceError(ValueError):
    """The actors asked for can never run on this cluster; str(error) is one line naming the key."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0
    accelerators: tuple = ()  # Ray's accelerator_type:X resources of the node (X)


@dataclass(frozen=True)
class Cluster:
    """Total logical CPUs/GPUs of each alive node; `where` names it in messages."""

    nodes: tuple
    where: str = "the cluster"

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        return f"{self.where} has {self.cpus:g} CPU and {self.gpus:g} GPU ({len(self.nodes)} node{'s' * (len(self.nodes) != 1)})"


@dataclass(frozen=True)
class ActorResources:
    """What the model-actor pool asks Ray for (all numbers resolved)."""

    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float

    def describe(self) -> dict:
        return {"min_actors": self.min_actors, "max_actors": self.max_actors, "num_cpus_per_actor": self.num_cpus,
                "num_gpus_per_actor": self.num_gpus}


def cluster_from_ray_nodes(nodes: Iterable[dict]) -> Cluster:
    """`ray.nodes()` -> Cluster (alive nodes only, their total, not currently free, resources)."""
    alive = [n for n in nodes if n.get("Alive", n.get("alive", False))]
    return Cluster(tuple(Node(float(n.get("Resources", {}).get("CPU", 0)), float(n.get("Resources", {}).get("GPU", 0)),
                              tuple(sorted(k.split(":", 1)[1] for k in n.get("Resources", {}) if k.startswith("accelerator_type:"))))
                         for n in alive), "the Ray cluster")


def local_machine(ray_num_cpus: Optional[int] = None) -> Cluster:
    """This machine as a local Ray started by the run would see it: `resources.ray_num_cpus` or the CPUs
    this process may use, and the NVIDIA GPUs the driver lists (CUDA_VISIBLE_DEVICES restricts them).
    An estimate made without starting Ray; the run checks again against Ray's own count."""
    cpus = ray_num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return Cluster((Node(float(cpus), float(_visible_gpus())),), "this machine (as a local Ray would see it)")


def _visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def resolve(spec: ResourcesSpec, device: str, cluster: Cluster) -> ActorResources:
    """The actor pool's numbers for `spec` on `cluster` (see the module docstring), or ResourceError."""
    if not cluster.nodes:
        raise ResourceError(f"resources: {cluster.where} has no alive node")
    if spec.accelerator_type:
        nodes = tuple(n for n in cluster.nodes if spec.accelerator_type in n.accelerators)
        if not nodes:
            found = sorted({a for n in cluster.nodes for a in n.accelerators})
            raise ResourceError(f"resources.accelerator_type: no node of {cluster.where} has a {spec.accelerator_type} "
                                f"(it has {', '.join(found) or 'no accelerator type'})")
        cluster = Cluster(nodes, f"{cluster.where}'s {spec.accelerator_type} nodes")
    gpus = _gpus_per_actor(spec, device, cluster)
    gpu_slots = sum(math.floor(n.gpus / gpus + _EPS) for n in cluster.nodes) if gpus else None
    if spec.max_actors != "auto":
        actors = spec.max_actors
    else:
        actors = max(spec.min_actors, gpu_slots or 1)
    cpus = spec.num_cpus_per_actor if spec.num_cpus_per_actor != "auto" else _auto_cpus(cluster, actors, gpus > 0)
    resolved = ActorResources(spec.min_actors, actors, cpus, gpus)
    check(resolved, device, cluster)
    return resolved


def _gpus_per_actor(spec: ResourcesSpec, device: str, cluster: Cluster) -> float:
    if spec.num_gpus_per_actor != "auto":
        return float(spec.num_gpus_per_actor)
    return 1.0 if cluster.gpus >= 1 and device != "cpu" else 0.0


def _auto_cpus(cluster: Cluster, actors: int, on_gpus: bool) -> float:
    """Whole CPUs per actor leaving FREE_CPUS_AUTO free (1 for GPU actors, all of them for CPU actors);
    on a cluster too small for that, a share of what one read and one write task leave."""
    largest = max((n.cpus for n in cluster.nodes), default=0.0)
    whole = min(math.floor((cluster.cpus - FREE_CPUS_AUTO) / actors + _EPS), math.floor(largest + _EPS))
    if whole >= 1:
        return 1.0 if on_gpus else float(whole)
    share = math.floor(100 * (cluster.cpus - READ_WRITE_CPUS) / actors) / 100  # hundredths, rounded down
    if share <= 0:
        raise ResourceError(
            f"resources.num_cpus_per_actor: auto finds no CPU for a model actor: {cluster.describe()}, and one "
            f"read and one write task need {READ_WRITE_CPUS:g}; give the local Ray more logical CPUs "
            f"(resources.ray_num_cpus)")
    return share


def check(actors: ActorResources, device: str, cluster: Cluster) -> None:
    """ResourceError (one line) if `actors` can never run on `cluster`."""
    where = cluster.describe()
    if actors.num_gpus > 0 and cluster.gpus == 0:
        raise ResourceError(f"resources.num_gpus_per_actor: {actors.num_gpus:g} GPU per actor, but {where}; "
                            "set resources.num_gpus_per_actor=auto (or 0) for CPU actors")
    if device == "cuda" and actors.num_gpus == 0:
        raise ResourceError(f"model.device: 'cuda', but {where}; use model.device=auto" if cluster.gpus == 0 else
                            "model.device: 'cuda' needs resources.num_gpus_per_actor > 0 (or auto)")
    largest_gpus = max(n.gpus for n in cluster.nodes)
    if actors.num_gpus > largest_gpus + _EPS:
        raise ResourceError(f"resources.num_gpus_per_actor: {actors.num_gpus:g} GPU per actor, but no node has more "
                            f"than {largest_gpus:g} ({where})")
    largest_cpus = max(n.cpus for n in cluster.nodes)
    if actors.num_cpus > largest_cpus + _EPS:
        raise ResourceError(f"resources.num_cpus_per_actor: {actors.num_cpus:g} CPU per actor, but no node has more "
                            f"than {largest_cpus:g} ({where})")
    fit = sum(_fits_on(node, actors) for node in cluster.nodes)
    if actors.min_actors > fit:
        raise ResourceError(f"resources.min_actors: {actors.min_actors} actors of {_each(actors)} each, but only "
                            f"{fit} fit at once ({where})")
    placed = min(actors.max_actors, fit)
    left = cluster.cpus - placed * actors.num_cpus
    if left + _EPS < READ_WRITE_CPUS:
        raise ResourceError(
            f"resources.num_cpus_per_actor: {placed} actor(s) x {actors.num_cpus:g} CPU leave {max(left, 0):g} of the "
            f"{cluster.cpus:g} CPUs for the read and write tasks, which need {READ_WRITE_CPUS:g} "
            f"({READ_TASK_CPUS:g} + {WRITE_TASK_CPUS:g}): the job would hang; use num_cpus_per_actor=auto, "
            f"fewer actors (resources.max_actors) or more logical CPUs (resources.ray_num_cpus)")


def _fits_on(node: Node, actors: ActorResources) -> int:
    """How many actors one node holds at once."""
    by_cpu = math.floor(node.cpus / actors.num_cpus + _EPS) if actors.num_cpus > 0 else math.inf
    by_gpu = math.floor(node.gpus / actors.num_gpus + _EPS) if actors.num_gpus > 0 else math.inf
    return int(min(by_cpu, by_gpu, 10_000))


def _each(actors: ActorResources) -> str:
    return f"{actors.num_cpus:g} CPU" + (f" + {actors.num_gpus:g} GPU" if actors.num_gpus else "")
