"""``import engine`` exposes the engine's pieces for someone else's diffusers model."""

import pytest

import engine


@pytest.mark.parametrize("name", engine.__all__)
def test_public_names_resolve(name):
    assert getattr(engine, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        engine.no_such_thing
