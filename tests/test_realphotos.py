"""The real-photo benchmark's ground truth and splits (rrt_dist.datasets.realphotos), and the folder layout's second
query set (dataset.queries)."""
import numpy as np
import pandas as pd
import pytest

from rrt_dist.datasets.folder import read_folder
from rrt_dist.datasets.realphotos import PLACES, SOURCES, image_name, split_queries
from rrt_dist.schema import DatasetLayoutError


def test_every_place_splits_into_held_out_queries_and_a_gallery_of_its_other_views():
    roles = split_queries(PLACES, seed=0)
    sources = [source for place in PLACES for source in place.images]
    assert len(set(sources)) == len(sources) and {repo for repo, _ in sources} == set(SOURCES)
    pairs = [p for p in PLACES if len(p.images) == 2]
    for place in PLACES:
        counts = {role: list(roles[place.name].values()).count(role) for role in ("test", "val", "gallery")}
        assert counts["test"] + counts["val"] == place.queries and counts["gallery"] == len(place.images) - place.queries
        assert counts["gallery"] >= 1 and len({image_name(path) for _, path in place.images}) == len(place.images)
        if place not in pairs:                      # dealt test, val, test, ... within the place
            assert counts["test"] == (place.queries + 1) // 2
    dealt = [roles[p.name][path] for p in pairs for _, path in p.images if roles[p.name][path] != "gallery"]
    assert (dealt.count("test"), dealt.count("val")) == (len(pairs) - len(pairs) // 3, len(pairs) // 3)
    assert split_queries(PLACES, seed=0) == roles and split_queries(PLACES, seed=1) != roles


def test_a_folder_reads_another_query_file_over_the_same_gallery(tmp_path):
    pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"]}).to_csv(tmp_path / "gallery.csv", index=False)
    pd.DataFrame({"path": ["q.jpg"], "positives": ["a.jpg;c.jpg"]}).to_csv(tmp_path / "queries.csv", index=False)
    pd.DataFrame({"path": ["v.jpg", "w.jpg"], "positives": ["b.jpg", "c.jpg"]}).to_csv(tmp_path / "val.csv",
                                                                                    index=False)
    test, val = read_folder(tmp_path), read_folder(tmp_path, "val.csv")
    assert test.gallery.equals(val.gallery) and val.queries.num_rows == 2
    assert [p.tolist() for p in test.protocol.positives] == [[0, 2]]
    assert [p.tolist() for p in val.protocol.positives] == [[1], [2]]
    with pytest.raises(DatasetLayoutError, match="other.csv"):
        read_folder(tmp_path, "other.csv")
    assert np.array_equal(test.queries.column("id").to_numpy(), read_folder(tmp_path).queries.column("id").to_numpy())
