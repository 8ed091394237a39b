from hft_lightning.errors import ConfigError, find_config_error


def test_finds_a_config_error_wrapped_by_a_library():
    original = ConfigError("data.num_val must be positive")
    try:
        try:
            raise original
        except ConfigError as error:
            raise ValueError("Does not validate against any of the Union subtypes") from error
    except ValueError as wrapped:
        assert find_config_error(wrapped) is original


def test_other_errors_are_not_config_errors():
    try:
        try:
            raise KeyError("bug")
        except KeyError:
            raise RuntimeError("while handling") from None
    except RuntimeError as error:
        assert find_config_error(error) is None
    assert find_config_error(ValueError("plain")) is None
