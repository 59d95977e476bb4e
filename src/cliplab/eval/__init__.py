"""Evaluation: tasks (the ``eval task`` registry :data:`TASKS`), metrics, results and reports;
sharpness and layer-wise connectivity in :mod:`.sharpness` (imported on its own: it needs torch).

The datasets live in :mod:`cliplab.data.datasets`; their public names are re-exported here.
"""

from ..data.datasets import (
    ClassificationData,
    RetrievalData,
    classification_from_csv,
    classification_from_folder,
    fewshot_subset,
    load_dataset,
    retrieval_from_file,
    split_train_val,
)
from ..data.shapes.tasks import SHAPES_DEFAULT_N, SHAPES_TASKS

__all__ = [
    "SHAPES_DEFAULT_N",
    "SHAPES_TASKS",
    "ClassificationData",
    "RetrievalData",
    "classification_from_csv",
    "classification_from_folder",
    "fewshot_subset",
    "load_dataset",
    "retrieval_from_file",
    "split_train_val",
]

from .metrics import (accuracy, confusion_matrix, mean_per_class_recall, rank_correlation, retrieval_recall,
                      topk_accuracy)
from .report import build_report
from .results import make_result, read_results, write_results
from .suite import SUITES, evaluate, run_suite
from .tasks import (TASKS, TaskResult, fewshot, linear_probe, select_on_validation, zeroshot_classification,
                    zeroshot_retrieval)

__all__ += [
    "accuracy", "confusion_matrix", "mean_per_class_recall", "rank_correlation", "retrieval_recall", "topk_accuracy",
    "build_report", "make_result", "read_results", "write_results", "SUITES", "evaluate", "run_suite",
    "TASKS", "TaskResult", "fewshot", "linear_probe", "select_on_validation",
    "zeroshot_classification", "zeroshot_retrieval",
]
