# The tiny shapes RefSAM evaluated from cached reference tokens (compute_embeds / eval_embeds):
#   python tools/ref_sam_embeds.py compute --config-file configs/ref_sam/tiny_shapes.py \
#       --references shapes_train_ref5_seed0 --output output/ref_sam/tiny_shapes/embeds_ref5_seed0.safetensors \
#       train.init_checkpoint=output/ref_sam/tiny_shapes/model_final.pth
#   python train_net.py --config-file configs/ref_sam/tiny_shapes_embeds.py --eval-only [model.reference_bank.shots=3]
from .tiny_shapes import dataloader, lr_multiplier, model, optimizer, train

model.reference_bank.references = None
model.reference_bank.features_path = "${train.output_dir}/embeds_ref5_seed0.safetensors"
model.reference_bank.shots = 5  # any number up to the 5 cached per class
train.init_checkpoint = "${train.output_dir}/model_final.pth"
