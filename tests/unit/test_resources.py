"""Model-actor sizing (`pipeline.resources`): `auto` from what the cluster has, and every request the
cluster can never satisfy refused in one line naming the key, instead of a silent hang. No Ray."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.jobfile import JobFileError, load_job
from pipeline.resources import READ_WRITE_CPUS, ActorResources, Cluster, Node, ResourceError, cluster_from_ray_nodes, resolve
from schemas.job import ResourcesSpec

REPO = Path(__file__).resolve().parents[2]
LAPTOP = Cluster((Node(2),), "this machine")
ONE_CPU = Cluster((Node(1),), "this machine")
EIGHT_GPUS = Cluster((Node(64, 8),), "the Ray cluster")
TWO_GPU_NODES = Cluster((Node(16, 4), Node(16, 4), Node(8)), "the Ray cluster")


def spec(**fields) -> ResourcesSpec:
    return ResourcesSpec(**fields)


def refused(resources: ResourcesSpec, cluster: Cluster, device: str = "auto") -> str:
    with pytest.raises(ResourceError) as info:
        resolve(resources, device, cluster)
    message = str(info.value)
    assert "\n" not in message
    return message


def cpus_left(actors: ActorResources, cluster: Cluster) -> float:
    return cluster.cpus - actors.max_actors * actors.num_cpus


# ---------------------------------------------------------------------------------------------------
# auto


def test_auto_is_the_default():
    r = ResourcesSpec()
    assert (r.max_actors, r.num_gpus_per_actor, r.num_cpus_per_actor, r.ray_address) == ("auto", "auto", "auto", None)


def test_auto_on_a_two_cpu_machine_leaves_a_cpu_for_reads():
    actors = resolve(spec(), "auto", LAPTOP)
    assert actors == ActorResources(min_actors=1, max_actors=1, num_cpus=1.0, num_gpus=0.0)
    assert cpus_left(actors, LAPTOP) >= 1


def test_auto_cpu_actor_takes_the_other_whole_cpus():
    cluster = Cluster((Node(16),))
    assert resolve(spec(), "auto", cluster) == ActorResources(1, 1, 15.0, 0.0)
    assert resolve(spec(max_actors=3), "cpu", cluster) == ActorResources(1, 3, 5.0, 0.0)


def test_auto_cpu_actor_is_capped_at_the_largest_node():
    cluster = Cluster((Node(8), Node(8)))
    assert resolve(spec(), "auto", cluster).num_cpus == 8.0  # reads run on the other node


def test_auto_on_a_one_cpu_cluster_shares_what_reads_and_writes_leave():
    actors = resolve(spec(), "auto", ONE_CPU)
    assert actors.num_cpus == pytest.approx(1 - READ_WRITE_CPUS)
    assert cpus_left(actors, ONE_CPU) >= READ_WRITE_CPUS


def test_auto_on_gpus_is_one_actor_per_gpu_with_one_cpu_each():
    assert resolve(spec(), "auto", EIGHT_GPUS) == ActorResources(1, 8, 1.0, 1.0)
    assert resolve(spec(), "cuda", TWO_GPU_NODES) == ActorResources(1, 8, 1.0, 1.0)


def test_auto_gpu_actors_share_cpus_when_the_cluster_has_few():
    actors = resolve(spec(), "auto", Cluster((Node(4, 8),)))
    assert actors.max_actors == 8 and actors.num_gpus == 1 and 0 < actors.num_cpus < 1
    assert cpus_left(actors, Cluster((Node(4, 8),))) >= READ_WRITE_CPUS


def test_auto_keeps_numbers_the_user_set():
    assert resolve(spec(max_actors=2), "auto", EIGHT_GPUS) == ActorResources(1, 2, 1.0, 1.0)
    assert resolve(spec(num_gpus_per_actor=0.5), "auto", EIGHT_GPUS).max_actors == 16
    assert resolve(spec(num_cpus_per_actor=4, num_gpus_per_actor=2), "auto", EIGHT_GPUS) == ActorResources(1, 4, 4.0, 2.0)
    assert resolve(spec(min_actors=3), "auto", Cluster((Node(16),))).max_actors == 3  # never below min_actors


def test_device_cpu_on_a_gpu_cluster_asks_for_no_gpu():
    actors = resolve(spec(), "cpu", EIGHT_GPUS)
    assert actors.num_gpus == 0 and actors.max_actors == 1 and actors.num_cpus == 63


def test_numbers_are_used_as_given():
    demo = spec(max_actors=1, num_gpus_per_actor=0, num_cpus_per_actor=0.5)
    assert resolve(demo, "auto", Cluster((Node(4),))) == ActorResources(1, 1, 0.5, 0.0)


# ---------------------------------------------------------------------------------------------------
# requests the cluster can never satisfy: one line, naming the key and the numbers


def test_a_gpu_on_a_cpu_only_machine_is_refused():
    message = refused(spec(num_gpus_per_actor=1, num_cpus_per_actor=2, max_actors=4), LAPTOP)
    assert message.startswith("resources.num_gpus_per_actor: 1 GPU per actor, but this machine has 2 CPU and 0 GPU")


def test_cuda_without_a_gpu_is_refused():
    assert refused(spec(), LAPTOP, device="cuda").startswith("model.device: 'cuda', but this machine has 2 CPU and 0 GPU")


def test_more_gpus_per_actor_than_any_node_has():
    message = refused(spec(num_gpus_per_actor=8), TWO_GPU_NODES)
    assert message.startswith("resources.num_gpus_per_actor: 8 GPU per actor, but no node has more than 4")


def test_more_cpus_per_actor_than_any_node_has():
    message = refused(spec(num_cpus_per_actor=12), Cluster((Node(8), Node(8))))
    assert message.startswith("resources.num_cpus_per_actor: 12 CPU per actor, but no node has more than 8")


def test_the_shipped_caption_settings_on_two_cpus_are_refused_not_hung():
    """caption.yaml minus its GPU: one actor of 2 CPUs on 2 CPUs ('Active & requested resources: 3/2 CPU')."""
    message = refused(spec(num_gpus_per_actor=0, num_cpus_per_actor=2, max_actors=4), LAPTOP)
    assert message.startswith("resources.num_cpus_per_actor: 1 actor(s) x 2 CPU leave 0 of the 2 CPUs for the read and write")
    assert "would hang" in message


def test_actors_that_fill_the_cpus_are_refused():
    message = refused(spec(num_gpus_per_actor=0, num_cpus_per_actor=1, max_actors=2), LAPTOP)
    assert "2 actor(s) x 1 CPU leave 0 of the 2 CPUs" in message


def test_min_actors_that_cannot_all_start():
    message = refused(spec(min_actors=3, max_actors=3, num_gpus_per_actor=1), Cluster((Node(16, 2),)))
    assert message.startswith("resources.min_actors: 3 actors of 1 CPU + 1 GPU each, but only 2 fit at once")


def test_max_actors_beyond_the_gpus_is_not_an_error():
    """Ray Data just does not scale past what fits; only the actors that fit count against the CPUs."""
    assert resolve(spec(max_actors=8, num_gpus_per_actor=1, num_cpus_per_actor=2), "cuda", Cluster((Node(16, 2),))).max_actors == 8


def test_a_cluster_without_nodes():
    assert refused(spec(), Cluster((), "the Ray cluster")) == "resources: the Ray cluster has no alive node"


def test_cluster_from_ray_nodes_counts_alive_nodes_totals():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 1e9}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 4.0}}]
    cluster = cluster_from_ray_nodes(nodes)
    assert cluster.nodes == (Node(8, 2), Node(4, 0)) and cluster.cpus == 12 and cluster.gpus == 2


# ---------------------------------------------------------------------------------------------------
# the job file side: auto or numbers, one-line errors, the local profile, the dry run


def _job(tmp_path: Path, resources: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  uri: s3://b/in/\noutput:\n  uri: s3://b/out/\nmodel:\n  base: m\nresources:\n" + resources)
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("  num_gpus_per_actor: lots\n", "resources.num_gpus_per_actor: expected a number or 'auto', got 'lots'"),
    ("  num_cpus_per_actor: true\n", "resources.num_cpus_per_actor: expected a number or 'auto', got True"),
    ("  num_cpus_per_actor: 0\n", "resources.num_cpus_per_actor: input should be greater than 0"),
    ("  max_actors: 0\n", "resources.max_actors: input should be greater than or equal to 1"),
    ("  min_actors: 3\n  max_actors: 2\n", "resources.max_actors: must be >= min_actors"),
])
def test_bad_resource_values_are_one_line(tmp_path, text, expected):
    path = _job(tmp_path, text)
    with pytest.raises(JobFileError) as info:
        load_job(path)
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


def test_numbers_and_auto_both_load(tmp_path):
    r = load_job(_job(tmp_path, "  max_actors: 2\n  num_gpus_per_actor: 0.5\n  num_cpus_per_actor: auto\n")).resources
    assert (r.max_actors, r.num_gpus_per_actor, r.num_cpus_per_actor) == (2, 0.5, "auto")


def test_shipped_jobs_never_join_a_cluster_by_themselves():
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        assert load_job(job).resources.ray_address is None, job.name


@pytest.mark.parametrize("name", ["caption", "vqa"])
def test_local_profile_turns_a_gpu_job_into_one_this_machine_runs(name):
    job = load_job(REPO / "jobs" / f"{name}.yaml", ["input.uri=out/demo/input", "output.uri=out/x"], ["local"])
    assert job.model.base == "models/small-qwen2_5_vl-v2" and job.model.device == "auto"
    assert job.resources.num_gpus_per_actor == "auto" and job.resources.ray_address is None
    assert job.input.prompt == load_job(REPO / "jobs" / f"{name}.yaml").input.prompt  # the rest is the job's
    actors = resolve(job.resources, job.model.device, LAPTOP)
    assert actors.num_gpus == 0 and cpus_left(actors, LAPTOP) >= 1


def test_unknown_profile_is_one_line():
    with pytest.raises(JobFileError, match=r"--profile nope: no such profile .*shipped: local"):
        load_job(REPO / "jobs" / "vqa.yaml", profiles=["nope"])


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # this machine has no GPU, whatever the test host has
    return subprocess.run([sys.executable, "-m", "pipeline", "run", *args, "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_refuses_a_gpu_job_on_this_machine_in_one_line():
    result = _dry_run("jobs/caption.yaml", "--set", "input.uri=/nonexistent/in", "--set", "output.uri=/nonexistent/out")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "resources.num_gpus_per_actor: 1 GPU per actor, but this machine" in lines[0], result.stderr


def test_dry_run_reports_the_resolved_actors(tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1], "image": [b""], "question": ["q"]}), shards / "part-0.parquet")
    result = _dry_run("jobs/vqa.yaml", "--profile", "local", "--set", f"input.uri={shards}",
                      "--set", f"output.uri={tmp_path / 'out'}", "--set", "resources.ray_num_cpus=2")
    assert result.returncode == 0, result.stderr
    resources = json.loads(result.stdout)["resources"]
    assert resources["num_gpus_per_actor"] == 0 and resources["num_cpus_per_actor"] == 1 and resources["max_actors"] == 1
    assert resources["resolved_against"].startswith("this machine")


def test_accelerator_type_picks_its_nodes_or_is_refused():
    nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 8, "accelerator_type:H100": 1}},
             {"Alive": True, "Resources": {"CPU": 16, "GPU": 4, "accelerator_type:L4": 1}}]
    cluster = cluster_from_ray_nodes(nodes)
    assert resolve(spec(accelerator_type="H100"), "auto", cluster) == ActorResources(1, 8, 1.0, 1.0)
    assert resolve(spec(accelerator_type="L4"), "auto", cluster).max_actors == 4
    with pytest.raises(ResourceError, match=r"resources.accelerator_type: no node of the Ray cluster has a A100 \(it has H100, L4\)"):
        resolve(spec(accelerator_type="A100"), "auto", cluster)
