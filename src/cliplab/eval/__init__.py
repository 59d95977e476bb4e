"""Evaluation: tasks (the ``eval task`` registry :data:`TASKS`), metrics (anomaly detection metrics in
:mod:`.anomaly_metrics`), results and reports;
sharpness and layer-wise connectivity in :mod:`.sharpness` (imported on its own: it needs torch).

The datasets live in :mod:`cliplab.data.datasets`; their public names are re-exported here.
The names below are imported on first use (:mod:`cliplab.lazy`), so that reading the task
registry or the results format does not import the feature code.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "..data.shapes.tasks": ["SHAPES_DEFAULT_N", "SHAPES_TASKS"],
    "..data.datasets": ["ClassificationData", "RetrievalData", "classification_from_csv",
                        "classification_from_folder", "fewshot_subset", "load_dataset",
                        "retrieval_from_file", "split_train_val"],
    ".anomaly_metrics": ["anomaly_metrics", "aupro", "image_ap", "image_auroc", "pixel_auroc", "pro_curve"],
    ".metrics": ["accuracy", "confusion_matrix", "kendall_tau", "mean_per_class_recall", "ndcg_at_k",
                 "rank_correlation", "spearman",
                 "retrieval_recall", "topk_accuracy"],
    ".report": ["build_report"],
    ".results": ["make_result", "read_results", "write_results"],
    ".suite": ["SUITES", "evaluate", "run_suite"],
    ".tasks": ["TASKS", "TaskResult", "fewshot", "linear_probe", "select_on_validation",
               "zeroshot_classification", "zeroshot_retrieval"],
})
