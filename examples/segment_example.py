"""Research-script example: segment the example sarcoma with the Python API and measure it.

Run from the repository root:  python examples/segment_example.py
"""

from pathlib import Path

import medsam3d as m3

HERE = Path(__file__).resolve().parent / "sts041_ct"


def main() -> None:
    image = m3.load(HERE / "CT_image.nii.gz")
    print(image)  # geometry at a glance: shape, spacing, axis codes, modality

    # one box on the slice where the tumour is largest, in voxel indices (i0, j0, i1, j1)
    prompts = {"version": 1, "objects": [{"name": "sarcoma", "slice": 23, "box": [57, 57, 100, 109]}]}

    def progress(done: int, total: int, message: str) -> None:
        print(f"\r  {message:<24} {done}/{total}", end="", flush=True)

    # one call: segment, measure, write the label map and the JSON record (both or neither)
    record = m3.run_case(image, prompts, progress=progress,
                         outputs={"labels": "sarcoma_labels.seg.nrrd", "report": "sarcoma_record.json"})
    print()
    tumour = record.object("sarcoma")
    print(f"{tumour.name}: {tumour.volume_ml:.1f} mL on slices {tumour.slices} in {record.timings['segment_s']:.1f} s "
          f"({record.window['name']} window, {record.model['runtime']})")
    lo, hi = tumour.volume_ml_range  # how far the volume moves between the engine's alternatives
    print(f"  its {tumour.alternatives} alternative segmentations: {lo:.1f}-{hi:.1f} mL")

    # compare with the expert contour shipped with the example
    reference = m3.load_labels(HERE / "CT_mask.nii.gz", image)
    pred, ref = record.labels.array > 0, reference.array > 0
    print(f"Dice vs expert: {2 * (pred & ref).sum() / (pred.sum() + ref.sum()):.3f}")

    whole = tumour.measurements["whole"]
    print(f"max 3D diameter {whole['max_diameter_3d_mm']:.1f} mm, axial long/short axis "
          f"{whole['long_axis_mm']:.1f}/{whole['short_axis_mm']:.1f} mm, mean {whole['intensity']['mean']:.0f} HU")
    print("wrote sarcoma_labels.seg.nrrd (open it in 3D Slicer over CT_image.nii.gz) and sarcoma_record.json")


if __name__ == "__main__":
    main()
