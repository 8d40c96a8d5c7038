"""OmniMedVQA "Anatomy Identification" QA files (or Med-R1 splits) with a real checkpoint:

    python train.py --config configs/omnimedvqa.py:model=qwen2_5_vl_3b,method=anatomy_r1 --workdir runs/omni \
        --config.model.path=/models/Qwen2.5-VL-3B-Instruct \
        --config.data.train=/data/OmniMedVQA/QA_information/Open-access/train.json \
        --config.data.eval=/data/OmniMedVQA/QA_information/Open-access/test.json \
        --config.data.image_root=/data/OmniMedVQA

Categories (metrics per class) are the modality types. Memory: see configs/methods.py.
"""

from configs import default, methods


def get_config(arg=None):
    args = methods.parse_arg(arg, model=("qwen2_5_vl_3b", methods.REAL_MODELS), method=("anatomy_r1", methods.ARMS))
    return methods.override(default.get_config(), methods.REAL_MODEL, args["model"], {
        "data.train": "", "data.eval": "",  # required: local QA files
        "data.prompt_variant": "grpo",
        # OmniMedVQA images are mostly 384x384: 392x392 px, 28x28 = 784 patches, 196 image tokens. Larger
        # images are resized to fit 784 patches (aspect ratio kept).
        "data.patches_per_query": 784,
        "curriculum.backend": "embedding",
        "gdqa.kinds": ("rephrase", "permute"),
    }, args["method"])
