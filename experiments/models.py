"""The networks of the reproduced papers, as Flax linen modules (NHWC).

Every model is called as ``model.apply(variables, x, train=False)`` on float32
NHWC images and returns logits; ``train=True`` enables dropout (pass
``rngs={'dropout': key}``). Layers carry the papers' names (``ip1``,
``conv1``, ...) so per-layer settings and size tables read like the papers.

* ``lenet300``: LeNet-300-100, Dense 784-300-100-10 with ReLU; 266,610
  parameters on 28x28 inputs (it flattens whatever image size it gets).
* ``lenet5``: the Caffe LeNet-5 used by Deep Compression: conv 5x5x20 VALID,
  max-pool 2, conv 5x5x50 VALID, max-pool 2, flatten (800), dense 500 ReLU,
  dense 10; 431,080 parameters. Needs 28x28 inputs.
* ``teacher_mlp``: a wide MLP teacher (1200-1200 ReLU, dropout 0.5 on the
  hidden layers and 0.2 on the input), Hinton et al.'s MNIST teacher.

References:
  LeCun et al., Gradient-based learning applied to document recognition,
  1998. Han, Mao, Dally, Deep Compression, ICLR 2016,
  https://arxiv.org/abs/1510.00149. Hinton, Vinyals, Dean, Distilling the
  knowledge in a neural network, 2015, https://arxiv.org/abs/1503.02531.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LeNet300", "LeNet5", "TeacherMLP", "MODELS", "get_model",
           "input_shape", "param_count", "param_shapes", "init"]


class LeNet300(nn.Module):
  """LeNet-300-100: a 784-300-100-10 ReLU MLP (layers ip1, ip2, ip3)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))  # NHWC order
    x = nn.relu(nn.Dense(300, name="ip1")(x))
    x = nn.relu(nn.Dense(100, name="ip2")(x))
    return nn.Dense(self.num_classes, name="ip3")(x)


class LeNet5(nn.Module):
  """Caffe LeNet-5 (layers conv1, conv2, ip1, ip2); 28x28 inputs."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.Conv(20, (5, 5), padding="VALID", name="conv1")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Conv(50, (5, 5), padding="VALID", name="conv2")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # NHWC order: 4*4*50 = 800
    x = nn.relu(nn.Dense(500, name="ip1")(x))
    return nn.Dense(self.num_classes, name="ip2")(x)


class TeacherMLP(nn.Module):
  """A wide 1200-1200 ReLU MLP with dropout: a distillation teacher."""
  num_classes: int = 10
  width: int = 1200
  input_dropout: float = 0.2
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    for i in (1, 2):
      x = nn.relu(nn.Dense(self.width, name=f"ip{i}")(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="ip3")(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "teacher_mlp": TeacherMLP,
}

# The input geometry a model needs (None: any; the MLPs flatten).
_INPUT_SHAPE = {"lenet5": (28, 28, 1)}


def get_model(name: str, num_classes: int = 10) -> nn.Module:
  """The model registered as ``name`` (see :data:`MODELS`)."""
  try:
    return MODELS[name](num_classes=num_classes)
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def input_shape(name: str) -> tuple[int, int, int] | None:
  """The ``(H, W, C)`` input a model needs, or None if it takes any."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return _INPUT_SHAPE.get(name)


def param_count(tree) -> int:
  """Number of scalars in a (dense) parameter pytree."""
  return int(sum(np.prod(getattr(x, "shape", np.shape(x)), dtype=np.int64)
                 for x in jax.tree_util.tree_leaves(tree)))


def init(model: nn.Module, image_shape, key: jax.Array):
  """Initialise ``model`` for ``(H, W, C)`` images; returns ``{'params': ...}``."""
  # One compiled program instead of op-by-op dispatch (many small compiles).
  return jax.jit(model.init)(key, jnp.zeros((1, *image_shape), jnp.float32))


def param_shapes(model: nn.Module, image_shape):
  """``{'params': ...}`` of ``jax.ShapeDtypeStruct`` (no computation)."""
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
