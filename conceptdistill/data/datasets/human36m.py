"""Human3.6M frames with person boxes, in a documented CSV layout."""

from __future__ import annotations

from conceptdistill.data.datasets.box_csv import BoxCSVDataModule


class Human36MDataModule(BoxCSVDataModule):
    """Human3.6M frames with person boxes (truth = "box").

    The paper's 6000-frame subset is not published, so this reader takes a simple, documented layout that
    any extraction can be written into:

        root/
          frames/<any sub/path>/<name>.jpg|png     (the frames; option frames_dir)
          boxes.csv                                 (option csv)

    ``boxes.csv`` columns: ``image`` (path relative to frames/), ``x0,y0,x1,y1`` (pixel box on the stored
    frame, 0-based continuous edges: x1 = x0 + width), and optional ``split`` (train | val | test). Several
    rows for one image are unioned; a row with empty box cells lists an image with no person. Without a
    split column, ``test_fraction`` (default 0.2) of the images go to test by a deterministic hash. Only
    frames listed in the CSV belong to the data set. Boxes can be made from the official 2D pose
    (bounding box of the projected joints, padded) or the official body masks.
    """

    name = "Human3.6M"
    env_var = "HUMAN36M_ROOT"
    default_csv = "boxes.csv"
    layout = "frames/<name>.jpg|png and boxes.csv with columns image,x0,y0,x1,y1[,split] (image relative to frames/)"
    source = (
        "videos from http://vision.imar.ro/human3.6m/ (registration needed); extract frames and write boxes.csv "
        "yourself (the paper's 6000-frame subset is unpublished)"
    )
    truth = "box"

    def __init__(self, root=None, *, frames_dir: str = "frames", csv: str | None = None, **kwargs) -> None:
        super().__init__(root, csv=csv, images_dir=frames_dir, **kwargs)
