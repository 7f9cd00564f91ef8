"""serve.coordinators in the Helm chart: M coordinators (attention ranks 0..M-1) share the expert workers
(ranks M..M+N-1), each rank one Ray bundle {CPU: 1} (+ {GPU: 1} on CUDA). The chart passes --coordinators
to `mixserve serve`, sizes its slot check for expertWorkers + coordinators, and refuses M > 1 without
expert workers. Ray places the bundles: the extra coordinators sit on the head or on worker pods."""

from __future__ import annotations

import re

import pytest

from tests.deploy.helpers import (
    head_container,
    head_slots,
    helm_lint,
    helm_template,
    render,
    render_notes,
    serve_args,
    validate_rendered,
    worker_slots,
    worker_templates,
)

GPU = "nvidia.com/gpu"
TWO = ("--set", "serve.coordinators=2")
HEAD_FOR_TWO = ("--set", "head.raySlots=2", "--set", "head.gpus=2")  # both coordinators' bundles on the head
# the head keeps one bundle; the worker pod offers the expert workers' two and the second coordinator's
WORKERS_FOR_TWO = ("--set-json", 'workerGroups=[{"name":"gpu","replicas":1,"expertWorkersPerPod":3,"gpusPerPod":3}]')


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def ranks(r) -> int:
    args = serve_args(r)
    return int(args["workers"]) + int(args["coordinators"])


def test_default_is_one_coordinator_rendered_like_workers():
    args = serve_args(render(None))
    assert args["coordinators"] == "1" and args["workers"] == "2"
    script = head_container(render(None))["args"][0]
    assert "'--workers=2' '--coordinators=1'" in script, script


def test_two_coordinators_on_the_head():
    r = render(None, *TWO, *HEAD_FOR_TWO)
    assert serve_args(r)["coordinators"] == "2"
    head = head_container(r)
    assert re.search(r"^ray start --head .*--num-cpus=2 --num-gpus=2$", head["args"][0], re.M), head["args"][0]
    assert gpu_limit(head) == 2
    assert head_slots(r) + worker_slots(r) == ranks(r) == 4


def test_two_coordinators_with_one_on_a_worker_pod():
    r = render(None, *TWO, *WORKERS_FOR_TWO)
    assert serve_args(r)["coordinators"] == "2"
    assert gpu_limit(head_container(r)) == 1
    (worker,) = worker_templates(r)
    (container,) = worker["spec"]["containers"]
    assert gpu_limit(container) == 3 and re.search(r"--num-cpus=3 --num-gpus=3$", container["args"][0], re.M)
    assert (head_slots(r), worker_slots(r), ranks(r)) == (1, 3, 4)


def test_kuberay_head_offers_the_coordinators_bundles():
    r = render("kuberay-values.yaml", *TWO, *HEAD_FOR_TWO)
    assert serve_args(r)["coordinators"] == "2" and serve_args(r)["workers"] == "4"
    (rc,) = r.of_kind("RayCluster")
    params = rc["spec"]["headGroupSpec"]["rayStartParams"]
    assert (params["num-cpus"], params["num-gpus"]) == ("2", "2")
    assert gpu_limit(head_container(r)) == 2
    assert head_slots(r) + worker_slots(r) == ranks(r) == 6


def test_two_coordinators_on_cpu_need_only_slots():
    r = render("cpu-values.yaml", *TWO, "--set", "head.raySlots=2")
    assert serve_args(r)["coordinators"] == "2" and serve_args(r)["device"] == "cpu"
    assert GPU not in str(r.objects)
    assert head_slots(r) + worker_slots(r) == ranks(r) == 4


@pytest.mark.parametrize(("args", "workers", "offered"), [
    ((), 2, 3),                                                               # the default pods hold 3 ranks
    (("--set", "head.raySlots=2"), 2, 3),                                     # on CUDA a head bundle needs a GPU
    (("--set", "serve.expertWorkers=3", *HEAD_FOR_TWO), 3, 4),                # 3 + 2 ranks, 2 + 2 bundles
], ids=["defaults", "head-without-a-second-gpu", "three-expert-workers"])
def test_slot_check_counts_the_coordinators(args, workers, offered):
    proc = helm_template(None, *TWO, *args, check=False)
    assert proc.returncode != 0, f"rendered although {args}"
    message = (f"serve.expertWorkers ({workers}) + serve.coordinators (2) need {workers + 2} Ray bundles with one "
               f"GPU each, but the head and worker groups offer only {offered}")
    assert message in proc.stderr, proc.stderr


def test_more_than_one_coordinator_needs_expert_workers():
    values = (*TWO, "--set", "serve.expertWorkers=0")
    # the schema refuses expertWorkers 0 for any number of coordinators
    proc = helm_template(None, *values, check=False)
    assert proc.returncode != 0 and "serve/expertWorkers" in proc.stderr, proc.stderr
    # the chart's own check, reached without the schema, names both values
    proc = helm_template(None, *values, "--skip-schema-validation", check=False)
    assert proc.returncode != 0, "rendered 2 coordinators without expert workers"
    assert "serve.coordinators (2) > 1 needs serve.expertWorkers >= 1, got 0" in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two"])
def test_schema_rejects_a_coordinator_count_below_one_or_not_an_integer(value):
    proc = helm_template(None, "--set", f"serve.coordinators={value}", check=False)
    assert proc.returncode != 0 and "serve/coordinators" in proc.stderr, proc.stderr


def test_lint_and_kubernetes_schemas_with_two_coordinators():
    for args in ((*TWO, *HEAD_FOR_TWO), (*TWO, *WORKERS_FOR_TWO)):
        assert "0 chart(s) failed" in helm_lint(None, *args).stdout
        validate_rendered(render(None, *args))


def test_notes_count_the_coordinators_bundles(tmp_path):
    text = render_notes(tmp_path, None, *TWO, *HEAD_FOR_TWO)
    assert "  coordinators:    2, each with its own scheduler and 4096 MiB of KV cache\n" in text, text
    assert "  Ray bundles:     4 (serve.coordinators + serve.expertWorkers), {CPU: 1, GPU: 1} each\n" in text, text
    text = render_notes(tmp_path / "cpu", "cpu-values.yaml")
    assert "  Ray bundles:     3 (serve.coordinators + serve.expertWorkers), {CPU: 1} each\n" in text, text
