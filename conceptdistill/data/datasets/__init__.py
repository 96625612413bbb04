"""One module per real data set, each a `FileDataModule` (`conceptdistill.data.readers`) reading the data
set's official layout; `box_csv` is the shared reader of the CSV-described box data sets.

| class | env var | truth | specifics |
|---|---|---|---|
| `CUBDataModule` | CUB_ROOT (+ CUB_SEGMENTATIONS_ROOT) | mask | ``segmentations_root``, ``mask_threshold`` |
| `StanfordDogsDataModule` | STANFORD_DOGS_ROOT | box | |
| `StanfordCarsDataModule` | STANFORD_CARS_ROOT | box | |
| `Human36MDataModule` | HUMAN36M_ROOT | box | ``csv``, ``frames_dir``, ``test_fraction`` |
| `ChestXrayDataModule` | CHEST_XRAY_ROOT | box | ``csv``, ``images_dir``, ``path_column``, ``category``, ``test_fraction`` |
| `ImageFolderDataModule` | IMAGE_FOLDER_ROOT (+ IMAGE_FOLDER_MASKS) | mask or None | ``masks_root``, ``test_fraction``, ``mask_threshold`` |

Configs name the classes by their module (``conf/data/*.yaml``:
``_target_: conceptdistill.data.datasets.cub.CUBDataModule``).
"""
