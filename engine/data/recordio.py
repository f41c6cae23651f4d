"""Reader of MXNet RecordIO files (`train.rec` + `train.idx`) as InsightFace ships them, without mxnet.

Record framing (little endian):
    uint32 magic 0xced7230a
    uint32 lrecord: upper 3 bits cflag (0 whole record, 1 first part, 2 middle part, 3 last part),
                    lower 29 bits length of this part's payload
    payload, padded with zeros to a multiple of 4 bytes
A payload that contains the magic word is split into parts by the writer; the reader joins the
parts and puts the magic word back between them.

Image record payload (`mx.recordio.pack`):
    IRHeader struct "IfQQ" = flag (uint32), label (float32), id (uint64), id2 (uint64)
    if flag > 0: `flag` float32 labels follow (then the header's label field is unused)
    image bytes (JPEG or PNG)

Two file layouts exist:
- InsightFace (MS1MV2/MS1MV3/Glint360K): record 0 is a header whose labels hold
  (first_identity_record, end); images are records 1 .. first_identity_record-1; records
  first_identity_record .. end-1 describe one identity each, their labels holding the
  (start, end) range of that identity's image records.
- Plain `im2rec` output: no header record; every record is an image.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = 0xCED7230A
_FRAME = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A record that does not follow the RecordIO format; the message names the file and offset."""


@dataclass
class ImageRecord:
    flag: int
    label: float  # first label (multi-float labels take the first value)
    labels: tuple  # all float labels
    id: int
    id2: int
    image: bytes


def unpack_record(payload: bytes) -> ImageRecord:
    """Split one record payload into its IRHeader, float labels and image bytes."""
    if len(payload) < IR_HEADER.size:
        raise RecordIOError(f"record payload of {len(payload)} bytes is shorter than the IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload, 0)
    offset = IR_HEADER.size
    if flag > 0:
        end = offset + 4 * flag
        if end > len(payload):
            raise RecordIOError(f"record declares {flag} float labels but holds only {len(payload) - offset} bytes")
        labels = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=offset))
        offset = end
    else:
        labels = (float(label),)
    return ImageRecord(flag, labels[0], labels, id_, id2, payload[offset:])


def read_index(idx_path: str) -> dict[int, int]:
    """`train.idx`: one `record_id<TAB>byte_offset` line a record."""
    index = {}
    with open(idx_path, "r") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise RecordIOError(f"{idx_path}:{line_no}: expected 'record_id offset', got {line!r}")
            index[int(parts[0])] = int(parts[1])
    return index


class RecordIOReader:
    """Random access to the records of an indexed RecordIO file (picklable: reopens lazily per process)."""

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = rec_path
        self.idx_path = idx_path or os.path.splitext(rec_path)[0] + ".idx"
        for path in (self.rec_path, self.idx_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"RecordIO file {path} does not exist")
        self.index = read_index(self.idx_path)
        self.keys = sorted(self.index)
        self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def _handle(self):
        if self._file is None:
            self._file = open(self.rec_path, "rb")
        return self._file

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def read_payload(self, record_id: int) -> bytes:
        """The payload of one record (its parts joined)."""
        if record_id not in self.index:
            raise KeyError(f"{self.idx_path}: no record {record_id}")
        f = self._handle()
        offset = self.index[record_id]
        f.seek(offset)
        parts = []
        while True:
            frame = f.read(_FRAME.size)
            if len(frame) < _FRAME.size:
                raise RecordIOError(f"{self.rec_path}: truncated record {record_id} at offset {offset}")
            magic, lrecord = _FRAME.unpack(frame)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: bad magic 0x{magic:08x} for record {record_id} at offset {f.tell() - 8}")
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            data = f.read(length)
            if len(data) < length:
                raise RecordIOError(f"{self.rec_path}: truncated record {record_id} at offset {offset}")
            f.seek((4 - length % 4) % 4, os.SEEK_CUR)
            if parts:  # a continuation part: the writer removed a magic word here
                parts.append(struct.pack("<I", MAGIC))
            parts.append(data)
            if cflag in (0, 3):
                break
            if cflag not in (1, 2):
                raise RecordIOError(f"{self.rec_path}: bad cflag {cflag} in record {record_id}")
        return b"".join(parts)

    def read(self, record_id: int) -> ImageRecord:
        try:
            return unpack_record(self.read_payload(record_id))
        except RecordIOError as exc:
            raise RecordIOError(f"{self.rec_path}: record {record_id}: {exc}") from None

    def read_header(self, record_id: int) -> ImageRecord:
        """IRHeader and labels only (reads a few bytes; the image field is empty)."""
        f = self._handle()
        f.seek(self.index[record_id])
        frame = f.read(_FRAME.size + IR_HEADER.size)
        magic, lrecord = _FRAME.unpack_from(frame, 0)
        if magic != MAGIC:
            raise RecordIOError(f"{self.rec_path}: bad magic 0x{magic:08x} for record {record_id}")
        flag = IR_HEADER.unpack_from(frame, _FRAME.size)[0]
        if flag > 0:
            frame += f.read(4 * flag)
        record = unpack_record(frame[_FRAME.size:])
        record.image = b""
        return record


@dataclass
class RecordLayout:
    """Which records are images and which identity each belongs to.

    record_ids (N,) int64 image record ids, grouped by identity; labels (N,) int64 original labels.
    kind: "insightface" (header record 0 + identity records) or "plain" (im2rec output).
    """

    kind: str
    record_ids: np.ndarray
    labels: np.ndarray


def scan_layout(reader: RecordIOReader, progress=None) -> RecordLayout:
    """Find the image records and their labels, grouped by identity (record order within an identity).

    progress: optional callable(n) told how many records were scanned.
    """
    keys = reader.keys
    if not keys:
        raise RecordIOError(f"{reader.idx_path}: the index lists no records")
    first = reader.read_header(keys[0])
    if keys[0] == 0 and first.flag > 0 and len(first.labels) >= 2:
        id_start, id_end = int(first.labels[0]), int(first.labels[1])
        if 0 < id_start <= id_end and all(k in reader.index for k in range(id_start, id_end)):
            record_ids, labels = [], []
            for rid in range(id_start, id_end):
                header = reader.read_header(rid)
                if len(header.labels) < 2:
                    raise RecordIOError(f"{reader.rec_path}: identity record {rid} has no (start, end) range")
                start, end = int(header.labels[0]), int(header.labels[1])
                if end <= start:
                    continue
                # The class id is the label stored in the identity's image records.
                label = int(reader.read_header(start).label)
                record_ids.append(np.arange(start, end, dtype=np.int64))
                labels.append(np.full(end - start, label, dtype=np.int64))
                if progress is not None:
                    progress(end - start)
            if not record_ids:
                return RecordLayout("insightface", np.zeros(0, np.int64), np.zeros(0, np.int64))
            return RecordLayout("insightface", np.concatenate(record_ids), np.concatenate(labels))
    record_ids = np.asarray(keys, dtype=np.int64)
    labels = np.empty(len(keys), dtype=np.int64)
    for i, rid in enumerate(keys):
        labels[i] = int(reader.read_header(rid).label)
        if progress is not None and i % 4096 == 4095:
            progress(4096)
    order = np.argsort(labels, kind="stable")
    return RecordLayout("plain", record_ids[order], labels[order])
