# The tiny SAM of configs/quick/tiny_sam_shapes.py (same model, recipe and schedule), trained on the
# synthetic shapes WITH PARTS (shapes_parts_train, docs/click.md), so that it segments parts too:
#   OMP_NUM_THREADS=1 python train_net.py --config-file configs/quick/tiny_sam_shapes_parts.py
# The part annotations are instances of the dataset dicts (category ids 9, 10, with `part_of`), so
# PromptableSamTrainer's click sampling (an instance drawn uniformly among wholes AND parts, a click
# uniform inside it, its mask the target) gives:
#   - a click drawn inside a part -> the part's mask;
#   - a click drawn inside a whole -> the whole's mask, wherever it lands: off the part (unambiguous),
#     or on the part (SAM's ambiguity: the same click is also a right click for the part).
# SAM's multimask loss (only the best of the 3 masks of a click is supervised) is what lets one click
# on a part answer both, with different mask tokens (as SAM learns nested masks). Nothing else changes.
# Its checkpoint (output/quick_tiny_sam_parts/model_final.pth) loads where configs/quick/tiny_sam_shapes.py's
# does (e.g. job.sam_checkpoint of configs/sam_clustering/shapes_parts_tiny.py). Evaluation: proposal
# recall of the point grid on shapes_parts_val, wholes and parts together (per granularity:
# configs/click/shapes_parts_tiny.py with train.init_checkpoint=...).
# Seed-sensitive (docs/sam_clustering.md): seed 0 learns in 1000 iterations (val mask IoU whole 0.86 /
# part 0.82), seeds 1 and 2 do not; with train.max_iter=2000 (milestones [1800, 2000]) seed 1 does, seed 2 not.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import get_detection_dataset_dicts

from .tiny_sam_shapes import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

dataloader.train.dataset = L(get_detection_dataset_dicts)(names="shapes_parts_train")
dataloader.test.dataset = L(get_detection_dataset_dicts)(names="shapes_parts_val", filter_empty=False)

train.output_dir = "./output/quick_tiny_sam_parts"
