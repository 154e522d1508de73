"""Logistic regression on average-pooled feature maps: one fit for two uses.

    probe.py                       how well each layer of a checkpoint separates the classes
    train.py --cls_head_init probe starts stage 3 from a classifier fitted on the frozen features
                                   (linear probing, then fine-tuning: the new head's first
                                   gradients no longer come from random weights)
"""
import torch
import torch.nn.functional as F

from datasets import make_loader


@torch.no_grad()  # not inference_mode: the fit below needs autograd on these tensors
def pooled_features(model, dataset, batch_size=32):
    """({layer: (N, C) pooled features}, (N,) labels) over a dataset, in its order."""
    features, labels = {}, []
    for images, targets, _ in make_loader(dataset, batch_size, shuffle=False):
        for name, fmap in model.feature_maps(model.prepare_input(images)).items():
            features.setdefault(name, []).append(fmap.float().mean(dim=(2, 3)).cpu())
        labels.append(targets)
    return {name: torch.cat(chunks) for name, chunks in features.items()}, torch.cat(labels)


def fit_logistic_regression(x, y, num_classes, weight_decay, max_iter=300):
    """Multinomial logistic regression with L2 on standardised features (L-BFGS). Returns
    (weight (C, K), bias (K,)) that act on the raw features: logits = x @ weight + bias."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # fold the standardisation into the weights
        raw_weight = weight / std[:, None]
        return raw_weight, bias - mean @ raw_weight


def accuracy(weight, bias, x, y):
    return ((x @ weight + bias).argmax(1) == y).float().mean().item()
