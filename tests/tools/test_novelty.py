from deltanas.tools.novelty import NoveltyIndex, normalise_tokens

SRC = '''
import torch.nn as nn

class Net(nn.Module):
    """A small network."""
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, out_shape[0])

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
'''


def test_comments_docstrings_and_layout_are_ignored():
    noisy = SRC.replace('"""A small network."""', '"""Different words."""') + "\n# a comment\n\n"
    assert normalise_tokens(noisy) == normalise_tokens(SRC)


def test_copy_of_parent_is_not_novel():
    idx = NoveltyIndex()
    r = idx.check(SRC + "# tweak\n", SRC, "base")
    assert not r.novel and r.parent_similarity == 1.0 and r.nearest_id == "base"


def test_structural_change_is_novel_against_parent():
    idx = NoveltyIndex()
    changed = SRC.replace("nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)",
                          "nn.Conv2d(16, 64, 5, padding=2), nn.BatchNorm2d(64), nn.GELU(), nn.Dropout(0.1), "
                          "nn.Conv2d(64, 32, 1), nn.SiLU(), nn.AdaptiveMaxPool2d(1)")
    r = idx.check(changed, SRC, "base")
    assert r.novel and r.parent_similarity < 0.9


def test_archive_duplicate_is_caught_and_named():
    idx = NoveltyIndex()
    other = SRC.replace("16", "24")
    idx.add("c001", idx.signature(other))
    r = idx.check(other + "\n# same\n", SRC, "base")
    assert not r.novel and r.nearest_id == "c001" and r.max_similarity == 1.0


def test_signature_roundtrip_through_bytes():
    idx = NoveltyIndex()
    sig = idx.signature(SRC)
    again = idx.from_hashvalues(sig.hashvalues.tobytes())
    assert again.jaccard(sig) == 1.0


def test_untokenisable_source_still_hashes():
    idx = NoveltyIndex()
    r = idx.check('def f(:\n  """unterminated', SRC, "base")
    assert r.novel
