# The iterative click protocol on COCO panoptic val2017 with SAM ViT-H: after each click the prediction is
# the candidate with the highest predicted IoU, the next click goes to the centre of its largest error
# region (positive or negative), up to 20 clicks; NoC@85/90 and mIoU@1/5/10/20 (docs/click.md).
# 20 decoder passes per segment: about 20x the single-click run's decoder time.
from .coco_sam_vit_h import dataloader, model, train

model.max_clicks = 20
dataloader.evaluator.miou_clicks = [1, 5, 10, 20]
train.output_dir = "./output/click/coco_sam_vit_h_noc"
