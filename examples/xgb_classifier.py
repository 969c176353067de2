"""Train an XGBoost classifier on scikit-learn's breast cancer data set, as a job."""

from mljobs import create_compute_pool, remote

create_compute_pool("DEMO_POOL_CPU", instance_family="CPU_X64_S", max_nodes=1, if_not_exists=True)


@remote("DEMO_POOL_CPU", stage_name="payload_stage")
def train(n_estimators: int = 100) -> dict:
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import train_test_split
    from xgboost import XGBClassifier

    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    model = XGBClassifier(n_estimators=n_estimators, max_depth=3, learning_rate=0.1)
    model.fit(X_train, y_train)
    proba = model.predict_proba(X_test)[:, 1]
    metrics = {"accuracy": accuracy_score(y_test, proba > 0.5), "auc": roc_auc_score(y_test, proba)}
    print(metrics)
    return {"model": model, **metrics}


if __name__ == "__main__":
    job = train(100)
    out = job.result(timeout=600)
    print(job.id, "accuracy", round(out["accuracy"], 3), "auc", round(out["auc"], 3))
