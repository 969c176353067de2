def fit(n: int) -> float:
    return sum(i * i for i in range(n)) / max(n, 1)
