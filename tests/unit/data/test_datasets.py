"""util.data.datasets and util.data.crops on tiny generated folders."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from util.data.crops import (
    RandomSquareCrop,
    cache_transform,
    center_crop_arr,
    train_transform,
)
from util.data.datasets import (
    CachedLatentFolder,
    ImageFolderWithChecks,
    MRARDataset,
    cached_latent_path,
    find_class_folders,
    load_rgb,
    write_cached_latent,
)
from util.data.order import SeededSamples
from util.data.rgb import as_rgb


def _png(path, size=(6, 4), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "data" / "train"
    for cls, color in (("b_cls", (0, 255, 0)), ("a_cls", (255, 0, 0))):
        for i in range(5):
            _png(root / cls / f"img{i}.png", color=color)
    (root / ".ipynb_checkpoints").mkdir()
    return root


# --- crops -----------------------------------------------------------------------------------------

def test_center_crop_arr_size_and_center():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 30, 20))  # white central 20x20 square
    cropped = center_crop_arr(image, 8)
    assert cropped.size == (8, 8)
    assert np.asarray(cropped).min() > 200


def test_center_crop_arr_box_downsamples_large_images():
    image = Image.new("RGB", (100, 64), (10, 20, 30))
    assert np.array_equal(np.asarray(center_crop_arr(image, 16)), np.full((16, 16, 3), (10, 20, 30), np.uint8))


def test_random_square_crop_takes_a_full_side_square():
    columns = np.tile((np.arange(30) * 8).astype(np.uint8)[None, :, None], (10, 1, 3))  # pixel = 8 * column
    image = Image.fromarray(columns)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(20):
        crop = np.asarray(RandomSquareCrop(10)(image))  # side min(H, W) = 10, resized to 10: no resampling
        left = int(crop[0, 0, 0]) // 8
        assert 0 <= left <= 20
        assert np.array_equal(crop, columns[:, left:left + 10])
        offsets.add(left)
    assert len(offsets) > 5
    assert RandomSquareCrop(4)(image).size == (4, 4)


def test_train_and_cache_transforms_output_range_and_shape():
    image = Image.new("RGB", (12, 9), (255, 0, 128))
    for transform in (train_transform(8), cache_transform(8)):
        tensor = transform(image)
        assert tensor.shape == (3, 8, 8)
        assert tensor.min() >= -1 and tensor.max() <= 1
        assert torch.allclose(tensor[0], torch.ones(8, 8)) and torch.allclose(tensor[1], -torch.ones(8, 8))


def test_train_transform_flips_sometimes_cache_transform_never():
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 8))  # white left half
    torch.manual_seed(0)
    left_white = {bool(train_transform(8)(image)[0, :, 0].mean() > 0) for _ in range(20)}
    assert left_white == {True, False}
    assert all(cache_transform(8)(image)[0, :, 0].mean() > 0 for _ in range(5))


# --- image folder ----------------------------------------------------------------------------------

def test_find_class_folders_is_sorted_and_ignores_hidden(image_root):
    assert find_class_folders(str(image_root)) == (["a_cls", "b_cls"], {"a_cls": 0, "b_cls": 1})


def test_image_folder_labels_from_own_sorted_classes(image_root):
    dataset = ImageFolderWithChecks(str(image_root), transform=cache_transform(4))
    assert dataset.classes == ["a_cls", "b_cls"] and len(dataset) == 10
    image, label = dataset[0]
    assert label == 0 and image.shape == (3, 4, 4) and image[0].mean() == 1.0
    assert dataset[9][1] == 1


def test_image_folder_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        ImageFolderWithChecks(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderWithChecks(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolderWithChecks(str(tmp_path / "empty"))


def test_image_folder_warns_on_empty_class(image_root):
    (image_root / "c_empty").mkdir()
    with pytest.warns(UserWarning, match="c_empty"):
        dataset = ImageFolderWithChecks(str(image_root))
    assert dataset.class_to_idx["c_empty"] == 2 and len(dataset) == 10


def test_corrupt_image_raises_naming_file_or_is_skipped(image_root):
    bad = image_root / "a_cls" / "img0.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match="img0.png"):
        ImageFolderWithChecks(str(image_root))[0]
    dataset = ImageFolderWithChecks(str(image_root), skip_corrupt=True)
    with pytest.warns(UserWarning, match="img0.png"):
        image, label = dataset[0]
    assert image.size == (6, 4) and label == 0


def test_linked_folders_are_followed_inside_their_class_only_and_once(image_root, tmp_path):
    outside = tmp_path / "elsewhere"
    _png(outside / "far.png")
    _png(image_root / "a_cls" / "nested" / "deep.png")
    os.symlink(image_root, image_root / "a_cls" / "loop_to_root")  # a loop: the root holds a_cls
    os.symlink(image_root / "a_cls", image_root / "a_cls" / "nested" / "loop_to_class")
    os.symlink(image_root / "a_cls" / "nested", image_root / "a_cls" / "nested_again")  # the same folder twice
    os.symlink(outside, image_root / "b_cls" / "outside")
    os.symlink(image_root / "b_cls", tmp_path / "linked_class")
    (image_root / "c_linked").symlink_to(tmp_path / "linked_class")  # a class folder may itself be a link
    with pytest.warns(UserWarning, match="^5 linked folder"):  # c_linked is b_cls: its link out too
        dataset = ImageFolderWithChecks(str(image_root))
    relative = [(os.path.relpath(path, image_root), label) for path, label in dataset.samples]
    assert relative == ([(f"a_cls/img{i}.png", 0) for i in range(5)] + [("a_cls/nested/deep.png", 0)]
                        + [(f"b_cls/img{i}.png", 1) for i in range(5)]
                        + [(f"c_linked/img{i}.png", 2) for i in range(5)])


def test_a_plain_tree_is_listed_as_torchvision_lists_it(image_root):
    _png(image_root / "a_cls" / "sub" / "z.png")
    _png(image_root / "a_cls" / "sub" / "a.PNG")
    (image_root / "a_cls" / "notes.txt").write_text("x")
    ours = ImageFolderWithChecks(str(image_root)).samples
    (image_root / ".ipynb_checkpoints").rmdir()  # torchvision would list it as a class
    assert ours == torchvision.datasets.ImageFolder(str(image_root)).samples and len(ours) == 12


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", [[0, 65535], [32768, 257]], [[0, 255], [128, 1]]),
    ("I", [[0, 65535], [32768, 257]], [[0, 255], [128, 1]]),
])
def test_sixteen_bit_grey_keeps_its_range(tmp_path, mode, values, expected):
    image = Image.fromarray(np.array(values, dtype=np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    pixels = np.asarray(as_rgb(image))
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 2, 3)
    assert (pixels == np.array(expected)[..., None]).all()
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(path)
    assert np.asarray(load_rgb(str(path))).mean() == 128  # PIL's own convert("RGB") gives 255


def test_pixels_without_a_known_range_are_refused_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="mode F"):
        as_rgb(Image.fromarray(np.zeros((2, 2), dtype=np.float32)))
    with pytest.raises(ValueError, match="outside 0..65535"):
        as_rgb(Image.fromarray(np.array([[70000]], dtype=np.int32)))
    path = tmp_path / "float.tiff"
    Image.fromarray(np.zeros((2, 2), dtype=np.float32)).save(path)
    with pytest.raises(RuntimeError, match=f"cannot read image {path}: 32-bit float pixels"):
        load_rgb(str(path))
    assert as_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 0))).getpixel((0, 0)) == (10, 20, 30)


# --- cached latents --------------------------------------------------------------------------------

def test_cached_latent_path_mirrors_the_image_folder(tmp_path):
    image = tmp_path / "train" / "n01" / "x.JPEG"
    path = cached_latent_path(str(tmp_path / "cache"), str(tmp_path / "train"), str(image))
    assert path == os.path.join(str(tmp_path / "cache"), "n01", "x.JPEG.npz")
    with pytest.raises(ValueError, match="not inside"):
        cached_latent_path("cache", str(tmp_path / "train"), str(tmp_path / "other" / "x.png"))


def test_cached_latent_folder_reads_writer_output_and_flips_at_random(image_root, tmp_path):
    cache = tmp_path / "cache"
    for index, (image_path, _) in enumerate(ImageFolderWithChecks(str(image_root)).samples):
        write_cached_latent(cached_latent_path(str(cache), str(image_root), image_path),
                            torch.full((4, 2, 2), float(index)), np.full((4, 2, 2), -float(index), np.float32))
    assert not any(name.endswith(".tmp") for _, _, files in os.walk(cache) for name in files)
    dataset = CachedLatentFolder(str(cache), generator=torch.Generator().manual_seed(0))
    assert dataset.classes == ["a_cls", "b_cls"] and len(dataset) == 10
    assert [dataset.samples[i][1] for i in (0, 9)] == [0, 1]
    signs = set()
    for _ in range(20):
        moments, label = dataset[3]
        assert moments.shape == (4, 2, 2) and label == 0
        signs.add(float(moments[0, 0, 0]))
    assert signs == {3.0, -3.0}
    replay = torch.Generator().manual_seed(5)  # the draws come from the dataset's generator
    dataset.generator = torch.Generator().manual_seed(5)
    expected = [3.0 if torch.rand((), generator=replay).item() < 0.5 else -3.0 for _ in range(8)]
    assert [dataset[3][0][0, 0, 0].item() for _ in range(8)] == expected


def test_cached_latent_folder_fixed_classes_and_bad_file(tmp_path):
    cache = tmp_path / "cache"
    write_cached_latent(str(cache / "b" / "x.png.npz"), np.zeros((2, 1, 1)), np.zeros((2, 1, 1)))
    with pytest.warns(UserWarning, match="a"):
        dataset = CachedLatentFolder(str(cache), classes=["a", "b"])
    assert dataset[0][1] == 1
    np.savez(cache / "b" / "y.png.npz", other=np.zeros(1))
    with pytest.raises(RuntimeError, match="y.png.npz lacks"):
        CachedLatentFolder(str(cache))[1]


@pytest.mark.parametrize("text, message", [
    ('["a", "../other_cache/2"]', r"names folders that are not class folders of the cache: \['../other_cache/2'\]"),
    ('["a", ".."]', r"\['..'\]"),
    ('["a", "/abs"]', r"\['/abs'\]"),
    ('["a", "b', "is not valid JSON"),
    ('{"a": 0}', "must hold a JSON list of class folder names"),
])
def test_the_recorded_class_list_stays_inside_the_cache_and_is_named_when_malformed(tmp_path, text, message):
    cache = tmp_path / "cache"
    write_cached_latent(str(cache / "a" / "x.png.npz"), np.zeros((2, 1, 1)), np.zeros((2, 1, 1)))
    (cache / "classes.json").write_text(text)
    with pytest.raises(ValueError, match=f"^{cache / 'classes.json'} .*{message}"):
        CachedLatentFolder(str(cache))


# --- MRAR ------------------------------------------------------------------------------------------

def _index(tmp_path, lines):
    path = tmp_path / "mrar.jsonl"
    path.write_text("\n".join(json.dumps(line) if isinstance(line, dict) else line for line in lines) + "\n")
    return str(path)


def test_mrar_dataset_returns_four_images_and_folder_label(image_root, tmp_path):
    index = _index(tmp_path, [{"cate": "b_cls", "files": ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png"]},
                              {"cate": "a_cls", "files": ["img4.png", "img3.png", "img2.png", "img1.png"]}])
    dataset = MRARDataset(str(image_root), index, transform=train_transform(4))
    assert len(dataset) == 2
    *images, label = dataset[0]
    assert label == 1 and len(images) == 4
    assert all(image.shape == (3, 4, 4) for image in images)
    assert all(torch.allclose(image[1], torch.ones(4, 4)) for image in images)  # green class
    assert dataset[1][-1] == 0


@pytest.mark.parametrize("line, message", [
    ({"cate": "zzz", "files": ["img0.png"] * 4}, "class 'zzz' is not a class folder"),
    ({"cate": "a_cls", "files": ["img0.png", "img1.png", "img2.png"]}, "needs at least 4 files"),
    ("not json", r"mrar.jsonl:1: expected"),
    ({"cate": "a_cls", "files": ["img0.png", "img1.png", "gone.png", "img3.png"]}, "'gone.png' is not a file of"),
    ({"cate": "a_cls", "files": ["img0.png", "../b_cls/img1.png", "img2.png", "img3.png"]},
     "a group holds images of its own class"),
])
def test_mrar_dataset_bad_lines_are_clear_errors(image_root, tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        MRARDataset(str(image_root), _index(tmp_path, [line]))


def test_mrar_dataset_missing_index(image_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="MRAR index file not found"):
        MRARDataset(str(image_root), str(tmp_path / "none.jsonl"))


def test_train_transform_without_hflip_never_mirrors():
    pixels = (np.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).astype(np.uint8)  # [H, W, 3], asymmetric
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W] in [-1, 1]
    transform = train_transform(32, hflip=False)
    for _ in range(16):
        assert torch.allclose(transform(Image.fromarray(pixels)), expected, atol=1e-6)
    flipped = [torch.allclose(train_transform(32)(Image.fromarray(pixels)), expected.flip(-1), atol=1e-6)
               for _ in range(16)]
    assert any(flipped) and not all(flipped)


def test_sample_seeding_touches_the_cpu_generator_only(image_root, monkeypatch):
    """A sample's draws are seeded on the CPU generator, which is restored after it; the GPUs' generators (the
    model's dropout and noise on CUDA) are never reseeded, also with --num_workers 0."""
    def reseeded(*args):
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    samples = SeededSamples(ImageFolderWithChecks(str(image_root), transform=train_transform(8)), seed=3)
    before = torch.get_rng_state()
    first = samples[(0, 1)][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(samples[(0, 1)][0], first)  # the same sample of the same epoch draws the same crop and flip
