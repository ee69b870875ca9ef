"""Scripts the tests run as processes (under torchrun or plain python); some are imported too."""
