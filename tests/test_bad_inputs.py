"""A corpus of bad inputs, one reader after the other: each is refused through the CLI with exit
code 2, one line on stderr, no traceback and nothing written.

The corrupt files are built in ``tmp_path`` from real ones: the bundled example CT
(``examples/sts041_ct``), nibabel's own test files, and the shared data set (those cases skip
with a reason when it is absent). Headers claiming absurd sizes run in a subprocess under a
memory limit (``RLIMIT_AS``): they must be refused before anything is allocated.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medsam3d as m3
from medsam3d.cli import main

from conftest import EXAMPLES, shared

pytestmark = pytest.mark.filterwarnings("ignore")

CT = EXAMPLES / "sts041_ct" / "CT_image.nii.gz"
MASK = EXAMPLES / "sts041_ct" / "CT_mask.nii.gz"
PROMPTS = EXAMPLES / "sts041_ct" / "prompts.json"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


# ---------------------------------------------------------------------- the CLI and its one-line refusal
def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, tmp_path: Path, *argv, match: str | None = None) -> str:
    """Run the CLI in-process; assert exit 2, one line on stderr, no traceback, nothing new on disk."""
    before = _files(tmp_path)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, f"exit {rc}; stdout: {out[-500:]}; stderr: {err[-500:]}"
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("medsam3d: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert _files(tmp_path) == before, f"written: {_files(tmp_path) - before}"
    if match:
        assert re.search(match, err), err
    return lines[0]


def _ct() -> nib.Nifti1Image:
    return nib.load(CT)


def _raw_nifti() -> bytes:
    """The example CT as an uncompressed NIfTI-1 file (header at 0, voxels from 352)."""
    return gzip.decompress(CT.read_bytes())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _patched(data: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


# ---------------------------------------------------------------------- NIfTI (and its pairs, MGH)
def _nifti_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    raw = _raw_nifti()
    ct = _ct()
    data = np.asanyarray(ct.dataobj)
    cases = {
        "empty": (_write(tmp / "empty.nii.gz", b""), "empty file"),
        "gzip-cut-in-header": (_write(tmp / "cut_header.nii.gz", CT.read_bytes()[:40]), "cannot read"),
        "gzip-cut-in-voxels": (_write(tmp / "cut_voxels.nii.gz", CT.read_bytes()[:200_000]), "truncated|cannot read"),
        "raw-cut-in-header": (_write(tmp / "cut_header.nii", raw[:200]), "cannot read"),
        "raw-cut-in-voxels": (_write(tmp / "cut_voxels.nii", raw[:352 + 10_000]), "truncated"),
        "bad-datatype": (_write(tmp / "datatype.nii", _patched(raw, 70, "<h", 9999)), "cannot read"),
        "bad-dim-count": (_write(tmp / "ndim.nii", _patched(raw, 40, "<h", 9)), "cannot read"),
        "negative-dims": (_write(tmp / "negdim.nii", _patched(raw, 42, "<hhh", -153, 163, 53)), "cannot read|corrupt"),
        "nan-affine": (_write(tmp / "nan_affine.nii", _patched(_patched(raw, 254, "<h", 1), 280, "<f", float("nan"))),
                       "finite 4x4 affine"),
        "wrong-magic": (_write(tmp / "magic.nii", _patched(raw, 344, "4s", b"xx1\0")), "cannot read|Analyze"),
        "text-named-nifti": (_write(tmp / "notes.nii", b"patient notes, not an image\n" * 20), "cannot read"),
        "gzip-of-junk": (_write(tmp / "junk.nii.gz", gzip.compress(os.urandom(2000))), "cannot read"),
        "png-named-nifti": (_write(tmp / "picture.nii.gz", b"\x89PNG\r\n\x1a\n" + os.urandom(500)), "cannot read"),
        "2d-image": (tmp / "slice.nii.gz", "2D image.*needs a 3D volume|2D image.*stacks of slices"),
        "4d-without-volume": (tmp / "two.nii.gz", r"found 2 volumes.*--volume N, N in 0\.\.1"),
        "5d-image": (tmp / "five.nii.gz", "dimensions beyond the third"),
        "all-nan-voxels": (tmp / "nan.nii.gz", "NaN or infinite"),
        "all-inf-voxels": (tmp / "inf.nii", "NaN or infinite"),
        "analyze-header": (tmp / "analyze.hdr", "Analyze 7.5"),
        "pair-without-img": (tmp / "pair.hdr", r"voxel file pair\.img"),
        "pair-img-cut": (tmp / "cutpair.img", "truncated|cannot read"),
        "mgz-cut": (tmp / "cut.mgz", "cannot read|truncated"),
        "mgh-4d-without-volume": (tmp / "four.mgz", r"found 2 volumes.*--volume"),
    }
    nib.save(nib.Nifti1Image(data[:, :, 20], ct.affine), tmp / "slice.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), ct.affine), tmp / "two.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2, 3), np.int16), np.eye(4)), tmp / "five.nii.gz")
    nib.save(nib.Nifti1Image(np.full(data.shape, np.nan, np.float32), ct.affine), tmp / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.inf, np.float32), ct.affine), tmp / "inf.nii")
    shutil.copy(NIBABEL_DATA / "analyze.hdr", tmp / "analyze.hdr")
    shutil.copy(NIBABEL_DATA / "nifti1.hdr", tmp / "pair.hdr")
    nib.save(nib.Nifti1Pair(data, ct.affine), tmp / "cutpair.img")
    _write(tmp / "cutpair.img", (tmp / "cutpair.img").read_bytes()[:5000])
    _write(tmp / "cut.mgz", (NIBABEL_DATA / "test.mgz").read_bytes()[:300])
    shutil.copy(NIBABEL_DATA / "test.mgz", tmp / "four.mgz")
    return cases


NIFTI_CASES = ["empty", "gzip-cut-in-header", "gzip-cut-in-voxels", "raw-cut-in-header", "raw-cut-in-voxels",
               "bad-datatype", "bad-dim-count", "negative-dims", "nan-affine", "wrong-magic",
               "text-named-nifti", "gzip-of-junk", "png-named-nifti", "2d-image", "4d-without-volume", "5d-image",
               "all-nan-voxels", "all-inf-voxels", "analyze-header", "pair-without-img", "pair-img-cut", "mgz-cut",
               "mgh-4d-without-volume"]


def test_a_header_nibabel_repairs_is_read_quietly(tmp_path, capsys):
    """A wrong sizeof_hdr is repaired by nibabel, which printed its own warning line on stderr."""
    path = _write(tmp_path / "sizeof.nii", _patched(_raw_nifti(), 0, "<i", 123456))
    rc, out, err = run_cli(capsys, "info", path)
    assert rc == 0 and err == "" and "[153, 163, 53]" in out
    assert np.array_equal(m3.load(path).array, m3.load(CT).array)


# ---------------------------------------------------------------------- NRRD and MetaImage
def _itk_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(CT))
    sitk.WriteImage(ct, str(tmp / "ct.nrrd"), False)  # raw encoding: known offsets
    sitk.WriteImage(ct, str(tmp / "ct.mha"), False)
    nrrd = (tmp / "ct.nrrd").read_bytes()
    mha = (tmp / "ct.mha").read_bytes()
    nrrd_head, nrrd_data = nrrd.split(b"\n\n", 1)
    mha_head, mha_data = mha.split(b"ElementDataFile = LOCAL\n", 1)
    mha_head += b"ElementDataFile = LOCAL\n"

    def nrrd_with(old: bytes, new: bytes) -> bytes:
        assert old in nrrd_head, (old, nrrd_head)
        return nrrd_head.replace(old, new) + b"\n\n" + nrrd_data

    def mha_with(old: bytes, new: bytes) -> bytes:
        assert old in mha_head, (old, mha_head)
        return mha_head.replace(old, new) + mha_data

    sizes = re.search(rb"sizes: [^\n]*", nrrd_head).group(0)
    dimsize = re.search(rb"DimSize = [^\n]*", mha_head).group(0)
    cases = {
        "nrrd-empty": (_write(tmp / "empty.nrrd", b""), "empty file"),
        "nrrd-cut-in-header": (_write(tmp / "cut_header.nrrd", nrrd[:60]), "cannot read|truncated"),
        "nrrd-cut-in-voxels": (_write(tmp / "cut_voxels.nrrd", nrrd[: len(nrrd_head) + 5000]), "truncated"),
        "nrrd-wrong-magic": (_write(tmp / "magic.nrrd", b"NRRX" + nrrd[4:]), "cannot read"),
        "nrrd-bad-sizes": (_write(tmp / "sizes.nrrd", nrrd_with(sizes, b"sizes: a b c")), "cannot read"),
        "nrrd-bad-type": (_write(tmp / "type.nrrd", nrrd_with(b"type: float", b"type: quaternion")), "cannot read"),
        "nrrd-bad-encoding": (_write(tmp / "enc.nrrd", nrrd_with(b"encoding: raw", b"encoding: rot13")),
                              "cannot read"),
        "nrrd-2d": (tmp / "slice.nrrd", "2D image"),
        "nrrd-4d-without-volume": (tmp / "two.nrrd", r"found 2 volumes.*--volume"),
        "nrrd-vector-without-volume": (tmp / "rgb.nrrd", r"found 3 components per voxel.*--volume"),
        "nrrd-all-nan": (tmp / "nan.nrrd", "NaN or infinite"),
        "nhdr-without-data": (tmp / "detached.nhdr", "cannot read"),
        "mha-empty": (_write(tmp / "empty.mha", b""), "empty file"),
        "mha-cut-in-header": (_write(tmp / "cut_header.mha", mha[:40]), "cannot read"),
        "mha-cut-in-voxels": (_write(tmp / "cut_voxels.mha", mha[: len(mha_head) + 5000]), "truncated"),
        "mha-wrong-magic": (_write(tmp / "junk.mha", os.urandom(3000)), "cannot read"),
        "mha-bad-ndims": (_write(tmp / "ndims.mha", mha_with(b"NDims = 3", b"NDims = 9")), "cannot read|truncated"),
        "mha-negative-size": (_write(tmp / "negsize.mha", mha_with(dimsize, b"DimSize = -153 163 53")),
                              "cannot read|corrupt|truncated"),
        "mha-2d": (tmp / "slice.mha", "2D image"),
        "mha-4d-without-volume": (tmp / "two.mha", r"found 2 volumes.*--volume"),
        "mhd-without-raw": (tmp / "detached.mhd", "cannot read"),
    }
    array = sitk.GetArrayFromImage(ct)
    sitk.WriteImage(sitk.GetImageFromArray(array[20]), str(tmp / "slice.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(array[20]), str(tmp / "slice.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([array, array]), isVector=False), str(tmp / "two.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([array, array]), isVector=False), str(tmp / "two.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7, 8, 3), np.uint8), isVector=True), str(tmp / "rgb.nrrd"))
    nan = sitk.GetImageFromArray(np.full((6, 7, 8), np.nan, np.float32))
    sitk.WriteImage(nan, str(tmp / "nan.nrrd"))
    sitk.WriteImage(ct, str(tmp / "detached.nhdr"))
    sitk.WriteImage(ct, str(tmp / "detached.mhd"))
    for data_file in list(tmp.glob("detached.*")):
        if data_file.suffix not in (".nhdr", ".mhd"):
            data_file.unlink()
    return cases


ITK_CASES = ["nrrd-empty", "nrrd-cut-in-header", "nrrd-cut-in-voxels", "nrrd-wrong-magic", "nrrd-bad-sizes",
             "nrrd-bad-type", "nrrd-bad-encoding", "nrrd-2d", "nrrd-4d-without-volume", "nrrd-vector-without-volume",
             "nrrd-all-nan", "nhdr-without-data", "mha-empty", "mha-cut-in-header", "mha-cut-in-voxels",
             "mha-wrong-magic", "mha-bad-ndims", "mha-negative-size", "mha-2d", "mha-4d-without-volume",
             "mhd-without-raw"]


def test_a_third_party_nrrd_cut_short_is_refused(tmp_path, capsys):
    data = shared("pyradiomics/brain2_image.nrrd").read_bytes()
    for n, cut in enumerate((20, len(data) // 3, len(data) - 200)):  # the last 8 bytes are gzip's check only
        path = _write(tmp_path / f"cut{n}.nrrd", data[:cut])
        refused(capsys, tmp_path, "info", path, match="cannot read|truncated")


# ---------------------------------------------------------------------- 4D files: which volume?
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mgz"])
def test_a_4d_file_asks_for_a_volume_and_reads_the_one_asked(suffix, tmp_path, capsys):
    import SimpleITK as sitk

    ct = _ct()
    data = np.asanyarray(ct.dataobj)[:40, :30, :20]
    second = (data * 2).astype(np.float32)
    path = tmp_path / f"four{suffix}"
    if suffix in (".nii.gz", ".mgz"):
        cls = nib.Nifti1Image if suffix == ".nii.gz" else nib.MGHImage
        nib.save(cls(np.stack([data, second], axis=-1).astype(np.float32), ct.affine), path)
    else:
        image = sitk.GetImageFromArray(np.stack([data, second]).transpose(0, 3, 2, 1), isVector=False)
        sitk.WriteImage(image, str(path))
    refused(capsys, tmp_path, "info", path, match=r"found 2 volumes .*; choose one with --volume N, N in 0\.\.1")
    refused(capsys, tmp_path, "info", path, "--volume", "2", match=r"--volume within 0\.\.1.*found 2")
    rc, out, err = run_cli(capsys, "info", path, "--volume", "1", "--json")
    assert rc == 0, err
    assert json.loads(out)["volume_index"] == 1
    vol = m3.load(path, volume_index=1)
    assert vol.shape == data.shape and np.array_equal(vol.array, second)
    if suffix in (".nii.gz", ".mgz"):
        np.testing.assert_allclose(vol.affine, ct.affine, atol=1e-5)
    with pytest.raises(m3.VolumeIOError, match="found 2 volumes"):
        m3.load(path)
    with pytest.raises(m3.VolumeIOError, match="only with a 4D file"):
        m3.load(CT, volume_index=0)


def test_volume_on_a_dicom_folder_or_a_3d_file_is_refused(tmp_path, capsys):
    refused(capsys, tmp_path, "info", CT, "--volume", "0", match="only with a 4D file.*drop --volume")
    folder = shared("dcmqi_ct3slice/ct-3slice")
    refused(capsys, tmp_path, "info", folder, "--volume", "0", match="found one volume.*drop --volume")
    refused(capsys, tmp_path, "info", CT, "--volume", "-1", match="whole number >= 0")


# ---------------------------------------------------------------------- label maps that are images
def test_an_image_given_as_label_map_writes_nothing(tmp_path, capsys):
    """`medsam3d mesh CT_image.nii.gz -o y.stl` wrote 2,384 STL files (706 MB) and exited 0."""
    out = tmp_path / "out"
    out.mkdir()
    line = refused(capsys, tmp_path, "mesh", CT, "-o", out / "y.stl", match="looks like an image")
    assert "values >= 0" in line and "-1000" in line
    refused(capsys, tmp_path, "measure", CT, match="looks like an image")
    refused(capsys, tmp_path, "render", CT, "-o", out / "y.png", match="looks like an image")


def _label_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    ct = _ct()
    mask = np.asanyarray(nib.load(MASK).dataobj)

    def save(name, array):
        nib.save(nib.Nifti1Image(array, ct.affine), tmp / name)
        return tmp / name

    many = (np.arange(mask.size) % 300).reshape(mask.shape).astype(np.uint16)
    cases = {
        "nan-voxels": (save("nan.nii.gz", np.where(mask > 0, np.nan, 0).astype(np.float32)), "NaN or infinite"),
        "inf-voxels": (save("inf.nii.gz", np.where(mask > 0, np.inf, 0).astype(np.float32)), "NaN or infinite"),
        "fractional": (save("frac.nii.gz", (mask * 0.5).astype(np.float32)), "fractional"),
        "negative": (save("neg.nii.gz", (mask.astype(np.int16) * -1)), "values >= 0"),
        "300-labels": (save("many.nii.gz", many), r"at most 255 labels.*found 299 \(distinct non-zero.*--max-labels"),
        "4d-label-map": (save("four.nii.gz", np.stack([mask, mask], -1).astype(np.uint8)), "3D label map"),
        "2d-label-map": (save("flat.nii.gz", mask[:, :, 20].astype(np.uint8)), "2D image"),
    }
    return cases


@pytest.fixture(scope="module")
def label_corpus(tmp_path_factory):
    return _label_cases(tmp_path_factory.mktemp("labels"))


@pytest.mark.parametrize("case", ["nan-voxels", "inf-voxels", "fractional", "negative", "300-labels", "4d-label-map",
                                  "2d-label-map"])
@pytest.mark.parametrize("command", ["mesh", "measure", "render"])
def test_label_map_corpus_is_refused(case, command, label_corpus, capsys):
    path, message = label_corpus[case]
    out = path.parent / "out"
    out.mkdir(exist_ok=True)
    argv = [command, path] + (["-o", out / ("y.stl" if command == "mesh" else "y.png")] if command != "measure" else [])
    refused(capsys, path.parent, *argv, match=message)


def test_max_labels_lets_an_expert_past_the_limit(label_corpus, capsys):
    path, _ = label_corpus["300-labels"]
    with pytest.raises(m3.VolumeIOError, match="found 299 "):
        m3.load_labels(path)
    assert len(np.unique(m3.load_labels(path, max_labels=None).array)) == 300
    assert m3.load_labels(path, max_labels=299).shape == nib.load(path).shape
    refused(capsys, path.parent, "measure", path, "--max-labels", "298", match="at most 298 labels.*found 299 ")
    refused(capsys, path.parent, "measure", path, "--max-labels", "0", match="whole number >= 1")


def test_a_segmentation_format_has_no_label_limit(tmp_path):
    ct = m3.load(CT)
    many = ct.with_array((np.arange(int(np.prod(ct.shape))) % 300).reshape(ct.shape).astype(np.uint16))
    path = m3.save(many, tmp_path / "many.seg.nrrd")
    assert len(np.unique(m3.load_labels(path).array)) == 300


# ---------------------------------------------------------------------- paths
def test_paths_that_cannot_be_read(tmp_path, capsys):
    (tmp_path / "loop_a.nii.gz").symlink_to(tmp_path / "loop_b.nii.gz")
    (tmp_path / "loop_b.nii.gz").symlink_to(tmp_path / "loop_a.nii.gz")
    refused(capsys, tmp_path, "info", tmp_path / "loop_a.nii.gz", match="loop of symbolic links")
    refused(capsys, tmp_path, "mesh", tmp_path / "loop_a.nii.gz", "-o", tmp_path / "y.stl", match="loop")
    (tmp_path / "dangling.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    refused(capsys, tmp_path, "info", tmp_path / "dangling.nii.gz", match="symbolic link to nothing")
    refused(capsys, tmp_path, "info", tmp_path / ("x" * 300 + ".nii.gz"), match="too long")
    deep = tmp_path.joinpath(*(["d" * 200] * 25)) / "ct.nii.gz"  # over PATH_MAX (4096)
    refused(capsys, tmp_path, "info", deep, match="too long")
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    refused(capsys, tmp_path, "info", fifo, match="device, pipe or socket")
    refused(capsys, tmp_path, "info", "/dev/zero", match="device, pipe or socket")
    refused(capsys, tmp_path, "info", CT, "--series", "1.2.3", match="--series.*only with a DICOM.*drop --series")


def test_non_utf8_and_newline_names(tmp_path, capsys):
    """ITK aborted the process (a C++ exception) on a file name that is not UTF-8."""
    import SimpleITK as sitk

    name = os.fsdecode(b"ct_\xff\xfe")
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = tmp_path / (name + suffix)
        if suffix == ".nii.gz":
            shutil.copy(CT, path)
        else:
            sitk.WriteImage(sitk.ReadImage(str(CT)), str(tmp_path / f"clean{suffix}"))
            os.replace(tmp_path / f"clean{suffix}", path)
        rc, out, err = run_cli(capsys, "info", path)
        assert rc == 0 and "shape (voxels i, j, k): [153, 163, 53]" in out, err
        assert np.array_equal(m3.load(path).array, m3.load(CT).array)
        cut = tmp_path / (name + "_cut" + suffix)
        cut.write_bytes(path.read_bytes()[:3000])
        line = refused(capsys, tmp_path, "info", cut, match="truncated|cannot read")
        assert "\\udcff" in line or "\\xff" in line
    folder = tmp_path / os.fsdecode(b"dir_\xff")
    folder.mkdir()
    labels = m3.load_labels(MASK)
    for suffix in (".nrrd", ".nii.gz"):
        m3.save(labels, folder / (name + suffix))
        assert np.array_equal(m3.load_labels(folder / (name + suffix)).array, labels.array)
    newline = tmp_path / "two\nlines.nii.gz"
    newline.write_bytes(CT.read_bytes()[:3000])
    line = refused(capsys, tmp_path, "info", newline)
    assert "two\\nlines" in line


# ---------------------------------------------------------------------- DICOM
def _dicom_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    import pydicom
    from pydicom.uid import generate_uid

    source = shared("dcmqi_ct3slice/ct-3slice")

    def copy(name: str) -> Path:
        folder = tmp / name
        shutil.copytree(source, folder)
        return folder

    def files(folder: Path) -> list[Path]:
        return sorted(folder.iterdir())

    cases = {}
    folder = copy("empty_folder")
    for f in files(folder):
        f.unlink()
    cases["empty-folder"] = (folder, "DICOM files in .*found none")
    # a slice missing from a longer series (one gap of two): the spacing check finds it
    series = shared("ibsi_sts_041/dicom/CT/image")
    folder = tmp / "zero_byte_slice"
    shutil.copytree(series, folder)
    files(folder)[20].write_bytes(b"")
    cases["zero-byte-slice"] = (folder, "evenly spaced")
    folder = copy("cut_in_voxels")
    middle = files(folder)[1]
    middle.write_bytes(middle.read_bytes()[:-100_000])
    cases["slice-cut-in-voxels"] = (folder, "pixel data|truncated")
    folder = tmp / "cut_in_header"
    shutil.copytree(series, folder)
    middle = files(folder)[20]
    middle.write_bytes(middle.read_bytes()[:400])
    cases["slice-cut-in-header"] = (folder, "evenly spaced|pixel data")
    one = tmp / "single_cut.dcm"
    one.write_bytes(files(source)[0].read_bytes()[:300])
    cases["file-cut-in-header"] = (one, "corrupt header|cannot|expected")
    folder = copy("wrong_magic")
    for f in files(folder):
        data = bytearray(f.read_bytes())
        data[128:132] = b"DICX"
        f.write_bytes(bytes(data))
    cases["wrong-magic"] = (folder, "DICOM files in .*found none")
    folder = copy("bad_spacing")
    for f in files(folder):
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0, 0]
        ds.save_as(f)
    cases["zero-pixel-spacing"] = (folder, "invertible affine")
    folder = copy("bad_bits")
    for f in files(folder):
        ds = pydicom.dcmread(f)
        ds.BitsAllocated = 7
        ds.save_as(f)
    cases["bits-allocated-7"] = (folder, "pixel data")
    folder = copy("no_geometry")
    for f in files(folder)[1:]:
        f.unlink()
    ds = pydicom.dcmread(files(folder)[0])
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(files(folder)[0])
    cases["2d-without-geometry"] = (folder, "lacks geometry")
    folder = copy("rgb")
    for f in files(folder):
        ds = pydicom.dcmread(f)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
        ds.save_as(f)
    cases["rgb"] = (folder, "grey-level")
    folder = copy("two_volumes")
    for f in files(folder):
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(ds.InstanceNumber) + 100
        ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"b_{f.name}")
    cases["4d-two-volumes"] = (folder, r"found 2 volumes \(2 images at each of 3 positions.*--volume N, N in 0\.\.1")
    folder = copy("incomplete_volumes")
    ds = pydicom.dcmread(files(folder)[0])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "b_extra.dcm")
    cases["4d-incomplete"] = (folder, "same number of images at every slice position")
    folder = copy("link_loop")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    cases["symlink-loops-inside"] = (folder, None)  # read as the plain folder: exit 0 (checked below)
    return cases


DICOM_CASES = ["empty-folder", "zero-byte-slice", "slice-cut-in-voxels", "slice-cut-in-header", "file-cut-in-header",
               "wrong-magic", "zero-pixel-spacing", "bits-allocated-7", "2d-without-geometry", "rgb",
               "4d-two-volumes", "4d-incomplete"]


CORPORA = {"nifti": (_nifti_cases, NIFTI_CASES), "itk": (_itk_cases, ITK_CASES), "dicom": (_dicom_cases, DICOM_CASES)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``corpus(reader)``: that reader's corrupt files, built once (the DICOM ones skip without the shared data)."""
    built = {}

    def get(reader: str) -> dict[str, tuple[Path, str]]:
        if reader not in built:
            built[reader] = CORPORA[reader][0](tmp_path_factory.mktemp(reader))
        return built[reader]

    return get


@pytest.mark.parametrize("reader, case", [(r, c) for r, (_, cases) in CORPORA.items() for c in cases])
def test_corpus_is_refused(reader, case, corpus, capsys):
    """NIfTI/MGH, NRRD/MetaImage and DICOM: each corrupt file through `medsam3d info`."""
    path, message = corpus(reader)[case]
    refused(capsys, path.parent, "info", path, match=message)


@pytest.mark.parametrize("reader", ["nifti", "itk"])
def test_the_corpus_is_complete(reader, corpus):
    assert sorted(corpus(reader)) == sorted(CORPORA[reader][1])


def test_a_dicom_series_of_two_volumes_reads_the_one_asked(corpus, capsys):
    path, _ = corpus("dicom")["4d-two-volumes"]
    first, second = (m3.load(path, volume_index=n) for n in (0, 1))
    assert first.shape == second.shape == (512, 512, 3) and np.allclose(first.affine, second.affine)
    assert np.array_equal(second.array, first.array + 1)
    assert all(Path(f).name.startswith("b_") for f in second.meta["dicom_files"])
    assert not any(Path(f).name.startswith("b_") for f in first.meta["dicom_files"])
    rc, out, err = run_cli(capsys, "info", path, "--volume", "1", "--json")
    assert rc == 0 and json.loads(out)["volume_index"] == 1, err
    refused(capsys, path.parent, "info", path, "--volume", "2", match=r"within 0\.\.1.*found 2")


def test_symlink_loops_inside_a_dicom_folder_are_skipped(corpus, capsys):
    path, _ = corpus("dicom")["symlink-loops-inside"]
    rc, out, err = run_cli(capsys, "info", path, "--json")
    assert rc == 0, err
    assert json.loads(out)["shape"] == [512, 512, 3]


# ---------------------------------------------------------------------- DICOM SEG and RTSTRUCT
@pytest.fixture(scope="module")
def seg_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    ct_folder = shared("dcmqi_ct3slice/ct-3slice")
    ct = m3.load(ct_folder)
    labels = m3.load_labels(shared("dcmqi_ct3slice/liver_spine_seg.nrrd"), ct)
    seg = m3.save(labels, tmp / "seg.dcm", reference=ct)
    return ct_folder, seg, labels


def test_mesh_reads_a_dicom_seg_with_its_image(seg_case, tmp_path, capsys):
    """`mesh` on a DICOM SEG asked for --image, which mesh did not accept."""
    ct_folder, seg, labels = seg_case
    refused(capsys, tmp_path, "mesh", seg, "-o", tmp_path / "y.stl", match="pass the image \\(--image\\)")
    rc, out, err = run_cli(capsys, "mesh", seg, "--image", ct_folder, "-o", tmp_path / "y.stl", "--smooth", "0")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y_label1.stl", "y_label2.stl"]


def test_dicom_seg_corpus_is_refused(seg_case, tmp_path, capsys):
    import pydicom

    ct_folder, seg, _ = seg_case
    data = seg.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        "empty": _write(tmp_path / "empty.dcm", b""),
        "cut-in-header": _write(tmp_path / "cut_header.dcm", data[:400]),
        "cut-in-voxels": _write(tmp_path / "cut_voxels.dcm", data[: len(data) - 2000]),
    }
    ds = pydicom.dcmread(seg)
    del ds.SegmentSequence
    ds.save_as(tmp_path / "no_segments.dcm")
    cases["no-segment-sequence"] = tmp_path / "no_segments.dcm"
    ds = pydicom.dcmread(seg)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "other_source.dcm")
    cases["frames-of-another-series"] = tmp_path / "other_source.dcm"
    for name, path in cases.items():
        refused(capsys, tmp_path, "mesh", path, "--image", ct_folder, "-o", out / "y.stl")
        refused(capsys, tmp_path, "measure", path, "--image", ct_folder)
    other = shared("ibsi_sts_041/dicom/CT/image")
    refused(capsys, tmp_path, "measure", seg, "--image", other, match="references|series")
    refused(capsys, tmp_path, "measure", sorted(ct_folder.iterdir())[0], "--image", ct_folder,
            match="DICOM SEG or RTSTRUCT file.*Modality 'CT'")


def test_rtstruct_corpus_is_refused(tmp_path, capsys):
    import pydicom

    image = shared("ibsi_sts_041/dicom/CT/image")
    rs = shared("ibsi_sts_041/dicom/CT/mask/RS.dcm")
    data = rs.read_bytes()
    refused(capsys, tmp_path, "measure", rs, match="--image")
    cases = {
        "cut-in-header": (_write(tmp_path / "cut_header.dcm", data[:400]), "corrupt|unreadable|readable|no Modality"),
        "cut-in-contours": (_write(tmp_path / "cut.dcm", data[: len(data) // 2]), "corrupt|unreadable|readable"),
    }
    ds = pydicom.dcmread(rs)
    del ds.StructureSetROISequence
    ds.save_as(tmp_path / "no_rois.dcm")
    cases["no-roi-sequence"] = (tmp_path / "no_rois.dcm", "well-formed RTSTRUCT")
    ds = pydicom.dcmread(rs)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = list(contour.ContourData)[:-1]
    ds.save_as(tmp_path / "odd.dcm")
    cases["contour-not-in-triples"] = (tmp_path / "odd.dcm", "x, y, z triples")
    ds = pydicom.dcmread(rs)
    ds.ROIContourSequence[0].ReferencedROINumber = 99
    ds.save_as(tmp_path / "unknown_roi.dcm")
    cases["contour-of-an-unknown-roi"] = (tmp_path / "unknown_roi.dcm", "ROI number 99")
    out = tmp_path / "out"
    out.mkdir()
    for name, (path, message) in cases.items():
        refused(capsys, tmp_path, "measure", path, "--image", image, match=message)
        refused(capsys, tmp_path, "mesh", path, "--image", image, "-o", out / "y.stl", match=message)


# ---------------------------------------------------------------------- prompt files and Slicer markups
def _segment_refuses(capsys, tmp_path: Path, prompts: Path, match: str | None = None) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return refused(capsys, tmp_path, "segment", CT, "--prompts", prompts, "-o", out / "labels.nii.gz",
                   "--json", out / "report.json", match=match)


def _roi(**changes) -> dict:
    roi = {"type": "ROI", "name": "R", "coordinateSystem": "LPS", "coordinateUnits": "mm",
           "center": [-112.0, -80.0, 830.0], "size": [40.0, 40.0, 30.0],
           "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    roi.update(changes)
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                       "Schema/markups-schema-v1.0.3.json#", "markups": [roi]}


PROMPT_CASES = {
    "empty": (b"", "valid JSON"),
    "cut": (PROMPTS.read_bytes()[:30], "valid JSON"),
    "binary": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "UTF-8"),
    "latin-1": ('{"version": 1, "objects": [{"name": "t\xe9", "slice": 5, "box": [1, 1, 9, 9]}]}'.encode("latin-1"),
                "UTF-8"),
    "deep-nesting": (b"[" * 200_000 + b"]" * 200_000, "nesting too deep|valid JSON"),
    "huge-integer": (b'{"version": 1, "objects": [{"slice": ' + b"9" * 5000 + b', "box": [1, 1, 9, 9]}]}',
                     "prompt JSON document|digits"),
    "float-overflow": (b'{"version": 1, "objects": [{"slice": 5, "box": [1, 1, 9, 1e999]}]}', "finite"),
    "nan-box": (b'{"version": 1, "objects": [{"slice": 5, "box": [1, NaN, 9, 9]}]}', "finite"),
    "version-3": (b'{"version": 3, "objects": [{"slice": 5, "box": [1, 1, 9, 9]}]}', "version 1 or 2"),
    "not-an-object": (b'"a tumour on slice 5"', "JSON object"),
    "box-outside": (b'{"version": 1, "objects": [{"slice": 5, "box": [1, 1, 900, 9]}]}', "inside the slice"),
    "markups-cut": (json.dumps(_roi()).encode()[:50], "valid JSON"),
    "markups-not-a-list": (json.dumps({"markups": {"type": "ROI"}}).encode(), "non-empty 'markups' list"),
    "markups-roi-without-center": (json.dumps(_roi(center=None) | {}).encode().replace(b'"center": null, ', b""),
                                   "'center' and 'size'"),
    "markups-nan-size": (json.dumps(_roi(size=[float("nan"), 1, 1])).encode(), "finite"),
    "markups-negative-size": (json.dumps(_roi(size=[-4, 1, 1])).encode(), "size >= 0"),
    "markups-unknown-system": (json.dumps(_roi(coordinateSystem="XYZ")).encode(), "LPS or RAS"),
    "markups-points-only": (json.dumps({"markups": [{"type": "Fiducial", "controlPoints": []}]}).encode(),
                            "at least one ROI"),
    "markups-roi-elsewhere": (json.dumps(_roi(center=[5000.0, 5000.0, 5000.0])).encode(), "overlap the image"),
    "markups-roi-at-infinity": (json.dumps(_roi(center=[1e308, 1e308, 1e308], size=[1e308, 1e308, 1e308])).encode(),
                                "finite|overlap"),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_prompt_file_corpus_is_refused(case, tmp_path, capsys):
    content, message = PROMPT_CASES[case]
    suffix = ".mrk.json" if case.startswith("markups") else ".json"
    _segment_refuses(capsys, tmp_path, _write(tmp_path / f"prompts{suffix}", content), match=message)


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_prompt_file_corpus_is_a_prompt_error(case, tmp_path):
    from medsam3d.prompts import load_prompts

    content, message = PROMPT_CASES[case]
    suffix = ".mrk.json" if case.startswith("markups") else ".json"
    with pytest.raises(m3.PromptError, match=message) as info:
        load_prompts(_write(tmp_path / f"prompts{suffix}", content), m3.load(CT))
    assert "\n" not in str(info.value)


def test_prompt_paths_that_cannot_be_read(tmp_path, capsys):
    (tmp_path / "a.json").symlink_to(tmp_path / "b.json")
    (tmp_path / "b.json").symlink_to(tmp_path / "a.json")
    _segment_refuses(capsys, tmp_path, tmp_path / "a.json", match="loop of symbolic links")
    (tmp_path / "folder.json").mkdir()
    _segment_refuses(capsys, tmp_path, tmp_path / "folder.json", match="found a folder")
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(17 * 1024 * 1024)
    _segment_refuses(capsys, tmp_path, big, match="a few kB")
    latin = tmp_path / os.fsdecode(b"pr\xf6mpts.json")
    latin.write_bytes(b"{")
    _segment_refuses(capsys, tmp_path, latin, match="valid JSON")


def test_a_prompt_path_too_long_is_a_prompt_error(tmp_path):
    from medsam3d.prompts import load_prompts

    with pytest.raises(m3.PromptError, match="too long"):
        load_prompts(tmp_path / ("p" * 300 + ".json"), m3.load(CT))


def test_a_prompt_path_too_long_is_refused(tmp_path, capsys):
    _segment_refuses(capsys, tmp_path, tmp_path / ("p" * 300 + ".json"), match="too long")


# ---------------------------------------------------------------------- absurd sizes, under a memory limit
_LIMITED = textwrap.dedent("""
    import resource, sys, time
    import medsam3d.cli, nibabel, SimpleITK, pydicom  # the readers, imported before the limit
    status = open("/proc/self/status").read()
    used = int(next(line for line in status.splitlines() if line.startswith("VmSize")).split()[1]) * 1024
    limit = used + (1 << 30)  # 1 GiB more than the interpreter holds now
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    start = time.perf_counter()
    code = medsam3d.cli.main(sys.argv[1:])
    print(f"{time.perf_counter() - start:.2f}")
    sys.exit(code)
""")


def _absurd_files(tmp: Path) -> dict[str, Path]:
    import pydicom

    files = {}
    header = nib.Nifti2Header()
    header.set_data_shape((100000, 100000, 100000))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 544
    files["nifti2-100000^3"] = _write(tmp / "absurd2.nii.gz", gzip.compress(header.binaryblock + bytes(1000)))
    header = nib.Nifti1Header()
    header.set_data_shape((32767, 32767, 32767))
    header.set_data_dtype(np.float32)
    files["nifti1-32767^3-raw"] = _write(tmp / "absurd1.nii", header.binaryblock + bytes(4 + 1000))
    # a header whose claim the file could hold (1500^3 int16 = 6.75 GB of zeros, gzip members of 1 MB each):
    # refused because it cannot fit in the memory left, not because the file is short
    header = nib.Nifti1Header()
    header.set_data_shape((1500, 1500, 1500))
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    member = gzip.compress(bytes(1 << 20))
    with open(tmp / "zeros.nii.gz", "wb") as handle:
        handle.write(gzip.compress(header.binaryblock + bytes(4)))
        for _ in range(6440):
            handle.write(member)
    files["nifti1-6.75GB-of-zeros"] = tmp / "zeros.nii.gz"
    nrrd = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 100000\nspacings: 1 1 1\nendian: little\n"
    files["nrrd-raw"] = _write(tmp / "absurd.nrrd", nrrd + b"encoding: raw\n\n" + bytes(1000))
    files["nrrd-gzip"] = _write(tmp / "absurdz.nrrd", nrrd + b"encoding: gzip\n\n" + gzip.compress(bytes(1000)))
    files["seg-nrrd-gzip"] = _write(tmp / "absurd.seg.nrrd", nrrd.replace(b"type: short", b"type: unsigned char")
                                    + b"encoding: gzip\n\n" + gzip.compress(bytes(1000)))
    files["mha"] = _write(tmp / "absurd.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
                          b"ElementType = MET_SHORT\nElementSpacing = 1 1 1\nElementDataFile = LOCAL\n" + bytes(1000))
    source = sorted(shared("dcmqi_ct3slice/ct-3slice").iterdir())[0]
    ds = pydicom.dcmread(source)
    ds.Rows = ds.Columns = 65535
    (tmp / "dicom").mkdir()
    ds.save_as(tmp / "dicom" / "huge.dcm")
    files["dicom-65535^2"] = tmp / "dicom"
    return files


@pytest.fixture(scope="module")
def absurd_files(tmp_path_factory):
    return _absurd_files(tmp_path_factory.mktemp("absurd"))


@pytest.mark.parametrize("case", ["nifti2-100000^3", "nifti1-32767^3-raw", "nifti1-6.75GB-of-zeros", "nrrd-raw",
                                  "nrrd-gzip", "seg-nrrd-gzip", "mha", "dicom-65535^2"])
def test_absurd_sizes_are_refused_before_allocation(case, absurd_files, tmp_path):
    script = _write(tmp_path / "limited.py", _LIMITED.encode())
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["info", absurd_files[case]], ["mesh", absurd_files[case], "-o", out / "y.stl"]):
        proc = subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.rstrip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("medsam3d: error: "), proc.stderr
        assert "MemoryError" not in proc.stderr and "Traceback" not in proc.stderr
        assert re.search(r"claims|fits in memory|less than expected|pixel data", proc.stderr), proc.stderr
        assert float(proc.stdout.split()[-1]) < 20
        assert not list(out.iterdir())


def test_a_4d_image_beside_a_label_map_takes_volume(tmp_path, capsys):
    """mesh, measure and render read --image: a 4D one is told to choose with --volume, which they take."""
    ct = _ct()
    data = np.asanyarray(ct.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data + 1], axis=-1), ct.affine), tmp_path / "two.nii.gz")
    refused(capsys, tmp_path, "measure", MASK, "--image", tmp_path / "two.nii.gz", match="--volume N, N in 0..1")
    rc, out, err = run_cli(capsys, "measure", MASK, "--image", tmp_path / "two.nii.gz", "--volume", "1", "--json",
                           "--no-components")
    assert rc == 0, err
    (row,) = json.loads(out)
    mask = np.asanyarray(nib.load(MASK).dataobj) > 0
    assert row["intensity"]["max"] == float(data[mask].max() + 1)
    refused(capsys, tmp_path, "measure", MASK, "--volume", "1", match="--volume with --image")
