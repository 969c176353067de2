from pathlib import Path

from mljobs import submit_directory

job = submit_directory(Path(__file__).parent, "DEFAULT_POOL", entrypoint="main.py", stage_name="payload_stage",
                       args=["5000"])
print(job.id, job.result(timeout=120))
