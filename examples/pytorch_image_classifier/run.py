"""The pytorch_image_classifier example: a small CNN trained as a job on scikit-learn's 8x8
digits, with TensorBoard logs, the model and its metrics saved to a stage, then checked here.

    python run.py --epochs 10
    mljobs stage get @tensorboard/pytorch_image_classifier/ ./tb && tensorboard --logdir ./tb
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import digits_cnn
import torch

from mljobs import Session, create_compute_pool, remote

POOL = "DEMO_POOL_CPU"
LOG_STAGE = "@tensorboard/pytorch_image_classifier/"
MODEL_STAGE = "@models/pytorch_image_classifier/"


@remote(POOL, stage_name="payload_stage")
def train_job(session: Session, epochs: int, batch_size: int, log_stage: str, model_stage: str) -> dict:
    import json
    import os
    import tempfile
    from pathlib import Path

    import torch

    torch.set_num_threads(2)
    run = f"{log_stage}{os.environ.get('MLJOBS_JOB_ID', 'local')}/"  # one TensorBoard run per job
    with tempfile.TemporaryDirectory() as tmp:
        out = digits_cnn.train(str(Path(tmp) / "tb"), epochs=epochs, batch_size=batch_size)
        logs = session.file.put(Path(tmp) / "tb", run)
        model = out.pop("model")
        torch.save(model.state_dict(), Path(tmp) / "digits_cnn.pt")
        Path(tmp, "metrics.json").write_text(json.dumps(out, indent=2))
        session.file.put(Path(tmp) / "digits_cnn.pt", model_stage)
        session.file.put(Path(tmp) / "metrics.json", model_stage)
    return {**out, "log_dir": run, "event_files": [f["name"] for f in logs],
            "model_path": model_stage + "digits_cnn.pt"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="train a small CNN on 8x8 digits as a job")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error(f"--epochs {args.epochs} --batch-size {args.batch_size}: both must be at least 1")
    session = Session.builder.getOrCreate()
    create_compute_pool(POOL, instance_family="CPU_X64_S", max_nodes=1, if_not_exists=True)
    job = train_job(session, args.epochs, args.batch_size, LOG_STAGE, MODEL_STAGE)
    print("job", job.id, flush=True)
    out = job.result(timeout=900)
    events = [f["name"] for f in session.file.list(out["log_dir"]) if "tfevents" in f["name"]]
    with tempfile.TemporaryDirectory() as tmp:  # the model from the stage, scored here
        session.file.get(out["model_path"], tmp)
        model = digits_cnn.DigitsCNN()
        model.load_state_dict(torch.load(Path(tmp) / "digits_cnn.pt", weights_only=True))
    _, _, x_test, y_test = digits_cnn.load_digits_tensors()
    here = digits_cnn.accuracy(model, x_test, y_test)
    print(f"test accuracy {out['test_accuracy']:.3f} in the job, {here:.3f} here with the model from "
          f"{out['model_path']}; {len(events)} TensorBoard event file(s) on {out['log_dir']}", flush=True)
    report = {"job": job.id, "log_dir": out["log_dir"], "test_accuracy": out["test_accuracy"], "client_accuracy": here,
              "history": out["history"], "event_files": events}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
