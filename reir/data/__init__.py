"""Datasets: prepared split lists on disk -> image datasets for training and evaluation."""

from reir.data.registry import BENCHMARKS, DATA_NAMES, DatasetInfo, dataset_info
from reir.data.splits import SplitList, load_split_list, save_split_list, split_list_path

__all__ = ["BENCHMARKS", "DATA_NAMES", "DatasetInfo", "dataset_info", "SplitList", "load_split_list",
           "save_split_list", "split_list_path"]
