"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): run by tests/test_multinode.py in a process
of its own (a Cluster cannot share a process with the session Ray), inside private PID and mount namespaces
(`ray stop` safety, and Cluster writes /tmp/ray/ray_current_cluster, which `ray.init("auto")` elsewhere
would follow). Prints one JSON line of observations that the test asserts on.

    python tests/multinode_check.py WORKDIR DATA_FILE [DATA_FILE...]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker_nodes() -> dict[str, str]:
    """actor id -> node id of every live Ray Train worker, read from the GCS actor table."""
    from ray._private.state import state

    out = {}
    for actor_id, a in state.actor_table(None).items():
        if a.get("ActorClassName", "").endswith("RayTrainWorker") and a.get("State") == "ALIVE":
            out[actor_id] = a["Address"]["NodeID"]
    return out


def main(work: Path, files: list[str]) -> dict:
    t0 = time.monotonic()
    import ray
    from ray.cluster_utils import Cluster

    # Head: the driver, Train's controller and Ray Data's coordinators; 2 worker nodes of 1 CPU each.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "gcs_server_port": _free_port(),
            "include_dashboard": False,
            "dashboard_agent_listen_port": _free_port(),
            "object_store_memory": 200 * 1024**2,
            # Notice a lost node in ~3 s instead of Ray's production default of ~30 s.
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 1000,
                "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        },
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    head_id = cluster.head_node.node_id
    obs: dict = {"head": head_id, "workers": [w.node_id for w in workers]}

    # 1. Ray Data: raylstm's reader, one read task per block; each block records the node that read it.
    from raylstm.config import DataConfig
    from raylstm.sources import ReadOptions, read_reviews

    ds, _ = read_reviews(files, ReadOptions.from_config(DataConfig()), override_num_blocks=6)

    def tag(batch):
        import ray as _ray

        return {"node": [_ray.get_runtime_context().get_node_id()] * len(batch["text"])}

    read_nodes = ds.map_batches(tag, batch_format="pyarrow").unique("node")
    obs["read_nodes"] = sorted(read_nodes)
    obs["t_read"] = time.monotonic() - t0

    # 2. Training over the nodes with STRICT_SPREAD; one worker node is removed after the first checkpoint.
    from raylstm.config import load_config
    from raylstm.train import read_metrics, train

    cfg = load_config(
        None,
        [
            "model.hidden_size=32",
            "model.embed_dim=16",
            "model.num_layers=1",
            "data.seq_len=32",
            "train.batch_size=8",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.placement_strategy=STRICT_SPREAD",
            "train.max_steps=40",
            "train.eval_every=10",
            "train.warmup_steps=2",
            "train.sample_chars=20",
            "train.max_val_batches=2",
            "train.log_every=5",
            "train.max_failures=2",
            "train.keep_checkpoints=10",
        ],
    )
    cfg.data.sources = files
    run_dir = work / "runs" / "multinode"
    removed: dict = {"after": []}
    done = threading.Event()

    def remove_a_training_node() -> None:
        # Wait for a checkpoint (so the loss is bounded), note where the 2 workers run, remove a worker node
        # that hosts one, then keep noting where the restarted workers run until fit() returns.
        while not done.is_set():
            nodes = _train_worker_nodes()
            if "node" not in removed and (run_dir / "best.json").exists():
                victims = [w for w in workers if w.node_id in nodes.values()]
                if len(nodes) == 2 and victims:
                    removed["before"] = sorted(nodes.values())
                    removed["node"] = victims[0].node_id
                    removed["best_at_removal"] = json.loads((run_dir / "best.json").read_text())["checkpoint"]
                    removed["t"] = time.monotonic() - t0
                    cluster.remove_node(victims[0], allow_graceful=False)  # a machine lost, not a drain
            elif "node" in removed and len(nodes) == 2 and removed["node"] not in nodes.values():
                removed["after"] = sorted(nodes.values())
                removed.setdefault("t_after", time.monotonic() - t0)
            time.sleep(0.2)

    killer = threading.Thread(target=remove_a_training_node, daemon=True)
    killer.start()
    try:
        result = train(cfg, storage=str(work / "runs"), name="multinode")
    finally:
        done.set()
        killer.join(timeout=10)
    obs["removed"] = removed
    obs["t_train"] = time.monotonic() - t0
    obs["metrics"] = read_metrics(run_dir)
    obs["best_checkpoint"] = Path(result.best_checkpoint).name
    obs["final_step"] = max(m["step"] for m in obs["metrics"])
    ray.shutdown()
    cluster.shutdown()
    return obs


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private test cluster in its own namespace
    work = Path(sys.argv[1])
    print("MULTINODE " + json.dumps(main(work, sys.argv[2:]), default=str), flush=True)
