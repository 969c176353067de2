"""The first example: run a function as a job on the embedded local server."""

from mljobs import remote


@remote("DEFAULT_POOL", stage_name="payload_stage")
def hello_world(name: str = "world"):
    # import what the job needs inside the function
    from datetime import datetime

    print(f"{datetime.now()} Hello {name}!")
    return f"Hello {name}!"


if __name__ == "__main__":
    job = hello_world("developer")
    print("job id:", job.id)
    print("result:", job.result(timeout=120))
    print("status:", job.status)
    print("logs:  ", job.get_logs())
