"""SSG-VQA-format records (the paper's released GRPO*.json files, or the project's JSONL) with a
real Qwen2-VL / Qwen2.5-VL checkpoint from a local directory:

    python train.py --config configs/ssg_vqa.py:model=qwen2_5_vl_7b,method=anatomy_r1 --workdir runs/ssg \
        --config.model.path=/models/Qwen2.5-VL-7B-Instruct \
        --config.data.train=/data/anatomy_r1/GRPO-GDQA.json --config.data.eval=/data/ssg_vqa_test.json \
        --config.data.image_root=/data/CholecT45

model: qwen2_vl_2b | qwen2_5_vl_3b | qwen2_5_vl_7b (memory estimates in configs/methods.py:
7B needs fsdp over 8 x 80 GB GPUs or a TPU v5e-8; 3B and 2B fit one 80 GB GPU).
method: an arm of configs/methods.py ARMS (grpo, asc, gdqa, anatomy_r1, ...). S(q) comes from the
policy's own embeddings (no matrix is published for SSG-VQA); pass --config.curriculum.backend=matrix
--config.curriculum.matrix=FILE to use a class-similarity file instead.
"""

from configs import default, methods


def get_config(arg=None):
    args = methods.parse_arg(arg, model=("qwen2_5_vl_7b", methods.REAL_MODELS), method=("anatomy_r1", methods.ARMS))
    return methods.override(default.get_config(), methods.REAL_MODEL, args["model"], {
        "data.train": "", "data.eval": "",  # required: local record files
        "data.prompt_variant": "",  # each record's own template (grpo / numbered / numbered_choice)
        # CholecT45 frames (854x480) at the size Qwen's own processor gives them: 840x476 px, 60x34 = 2040
        # patches, 510 image tokens (+ ~200 prompt tokens < prompt_length 1024). Larger frames are resized
        # to fit; a smaller budget resizes these too (e.g. 1296: 672x364 px, 1248 patches).
        "data.patches_per_query": 2040,
        "curriculum.backend": "embedding",
        "gdqa.kinds": ("rephrase", "permute", "template"),
    }, args["method"])
