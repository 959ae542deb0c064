"""Where a ShardedCartoState is not supported yet (the Cartographer's epoch metrics, the Hugging
Face CartoTrainer / CartoCallback, the Lightning CartoCallback), it is refused with a ValueError
that says what to use instead, before anything runs."""
import pytest

import gdc_ext
from gdc_ext import CartoLoss, ShardedCartoState
from gdc_ext.cartographer import epoch_metrics

HINT = "does not support a ShardedCartoState yet"


@pytest.fixture()
def sharded():
    return ShardedCartoState(8, 1)


def test_epoch_metrics_refuses_a_sharded_state(sharded):
    with pytest.raises(ValueError, match=HINT) as e:
        epoch_metrics(sharded)
    assert "ShardedCartoSampler" in str(e.value) and "state.scores()" in str(e.value)


def test_hugging_face_integration_refuses_a_sharded_state(sharded):
    pytest.importorskip("transformers")
    from gdc_ext.integrations.hf import CartoCallback, CartoTrainer

    with pytest.raises(ValueError, match=HINT):
        CartoCallback(sharded)
    with pytest.raises(ValueError, match=f"CartoTrainer {HINT}"):
        CartoTrainer(state=sharded)
    with pytest.raises(ValueError, match=f"CartoTrainer {HINT}"):
        CartoTrainer(loss=CartoLoss(state=sharded))


def test_lightning_integration_refuses_a_sharded_state(sharded):
    pytest.importorskip("lightning.pytorch")
    from gdc_ext.integrations.lightning import CartoCallback

    with pytest.raises(ValueError, match=HINT):
        CartoCallback(sharded)


def test_the_losses_accept_a_sharded_state(sharded):
    assert CartoLoss(state=sharded).state is sharded
    assert gdc_ext.CartoLinearCrossEntropyLoss(4, 3, state=sharded).state is sharded
