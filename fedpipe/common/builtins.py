"""Imports every module that defines built-in registered classes, so they are registered."""

import fedpipe.common.aggregators
import fedpipe.common.metrics
import fedpipe.common.models
import fedpipe.common.modules
import fedpipe.common.regularizers
import fedpipe.common.schedulers  # noqa: F401
