from ..common.base import model, train

model.width = 16
train.max_iter = 20
extra = dict(items_=[1, 2, 3])
