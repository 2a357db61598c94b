"""Read scalar values from TensorBoard event files with TensorBoard's own reader.

Needs the ``tensorboard`` package (the ``tensorboard`` extra: ``pip install -e
".[tensorboard]"`` in the checkout), which Lightning's ``TensorBoardLogger`` requires
anyway. Records are read with TensorBoard's
record reader, which checks both CRCs of every record, and decoded as TensorBoard's
``Event`` protocol buffers. Scalars written by ``SummaryWriter.add_scalar`` as
``simple_value`` or as a one-element numeric tensor (``new_style=True``; TensorFlow 2's
``tf.summary.scalar``) are returned; a tensor is read as a scalar only if its tag's
summary metadata, which writers may give on the tag's first value only, names no plugin
or the ``scalars`` plugin. Text, histograms, images, graphs and other plugins' tensors
are skipped.

TensorBoard's own ``EventAccumulator`` is not used: it stops at the first truncated or
corrupt record and reports it only at debug log level, so a damaged file would be read
as a shorter run without a word. Here a damaged file raises :class:`EventFileError`,
which says where, and :func:`read_scalars` keeps the records before the damage only on
request (``partial_ok``), with the error message returned for the caller to show.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_scalars", "EventFileError", "TensorBoardMissingError", "INSTALL_HINT"]

INSTALL_HINT = (
    "reading TensorBoard event files needs the `tensorboard` package, the `tensorboard` "
    'extra: pip install -e ".[tensorboard]" in the nequip-mtl checkout (or pip install '
    "tensorboard)"
)


#: TensorBoard's plugin name of scalar summaries (``tensorboard.plugins.scalar.metadata``)
SCALARS_PLUGIN = "scalars"


class EventFileError(ValueError):
    """The file is not a readable TensorBoard event file, or it is truncated or corrupt."""


class TensorBoardMissingError(ImportError):
    """The ``tensorboard`` package is not installed."""


def _tensorboard():
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.tensorflow_stub import errors
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
        from tensorboard.util.tensor_util import make_ndarray
    except ImportError as err:
        raise TensorBoardMissingError(f"{INSTALL_HINT} ({err})") from err
    return Event, errors, PyRecordReader_New, make_ndarray


def read_scalars(
    path: str | Path, partial_ok: bool = False
) -> tuple[dict[str, list[tuple[int, float]]], str | None]:
    """``({tag: [(step, value), ...]}, problem)`` of every scalar in one event file, in
    file order.

    ``problem`` is ``None`` for an intact file. A file that ends in a truncated record
    (cut off, or still being written) or has a record failing its CRC check raises
    :class:`EventFileError`; with ``partial_ok``, the scalars of the intact records
    before the damage are returned instead, with ``problem`` saying what was wrong and
    how many records were read.

    Raises:
        TensorBoardMissingError: ``tensorboard`` is not installed
        EventFileError: the file is damaged (and not ``partial_ok``), or holds no
            event record at all
    """
    Event, errors, Reader, make_ndarray = _tensorboard()
    path = Path(path)
    reader = Reader(str(path))
    out: dict[str, list[tuple[int, float]]] = {}
    records = 0
    problem = None
    plugins: dict[str, str] = {}  # tag -> plugin named by its (first) summary metadata
    try:
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break  # end of file
            except errors.DataLossError as err:
                kind = "is truncated" if "truncated" in str(err.message) else "is corrupt"
                problem = (
                    f"{path} {kind} after {records} intact record(s) "
                    f"(TensorBoard's reader: {err.message})"
                )
                break
            try:
                event = Event.FromString(reader.record())
            except Exception as err:  # a record with valid CRCs that is not an Event
                raise EventFileError(f"{path}: record {records} is not an event: {err}") from err
            records += 1
            for value in event.summary.value:
                if value.HasField("metadata") and value.tag not in plugins:
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
                scalar = _scalar(value, make_ndarray, plugins.get(value.tag, ""))
                if scalar is not None:
                    out.setdefault(value.tag, []).append((int(event.step), scalar))
    finally:
        reader.file_handle.close()
    if records == 0:
        raise EventFileError(problem or f"{path} holds no TensorBoard event records")
    if problem is not None and not partial_ok:
        raise EventFileError(problem)
    return out, problem


def _scalar(value, make_ndarray, plugin: str) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor" and plugin in ("", SCALARS_PLUGIN):
        try:
            array = make_ndarray(value.tensor)
        except Exception:
            return None
        if array.size == 1 and array.dtype.kind in "fiub":
            return float(array.reshape(()))
    return None
