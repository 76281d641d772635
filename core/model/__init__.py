"""The AuxSegNet network: ResNet38 backbone, affinity module, multi-task net."""

from core.ablation import AFFINITIES, BRANCHES, CONSTRAINTS, SettingError, check_config

from .affinity import NonLocal, cross_task, cross_task_affinity, refine_with_affinity
from .auxsegnet import AuxSegNet, Classifier, head_width, normalize_cam
from .backbone import ResNet38, backbone_state_dict_from, load_backbone

__all__ = [
    "AFFINITIES",
    "BRANCHES",
    "CONSTRAINTS",
    "AuxSegNet",
    "Classifier",
    "NonLocal",
    "ResNet38",
    "SettingError",
    "backbone_state_dict_from",
    "check_config",
    "cross_task",
    "cross_task_affinity",
    "head_width",
    "load_backbone",
    "normalize_cam",
    "refine_with_affinity",
]
