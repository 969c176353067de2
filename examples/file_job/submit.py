from pathlib import Path

from mljobs import submit_file

job = submit_file(Path(__file__).with_name("my_script.py"), "DEFAULT_POOL", stage_name="payload_stage",
                  args=["arg1", "--arg2_key", "arg2_value"])
print(job.id, job.result(timeout=120))
