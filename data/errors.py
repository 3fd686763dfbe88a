"""The one exception type of the data pipeline.

Bad input (a missing path, a malformed flag, a corpus where nothing survives curation, a broken
tokenizer file) raises `DataError` with a one-line message that names the file, line or flag.
`python -m data.prepare` prints it as `error: <message>` and exits with status 2, like argparse
does for a bad flag, so a user never sees a traceback for a mistake in their input.
"""


class DataError(Exception):
    """Bad input to the data pipeline; the message names the file, line or flag at fault."""
