import numpy as np
import pytest

from orthodiff.errors import OrthodiffError
from orthodiff.planes import check_plane, plane_from_affine, plane_from_normal, slice_normal


def test_normal_is_cross_product_of_direction_cosines():
    assert np.allclose(slice_normal([1, 0, 0], [0, 1, 0]), [0, 0, 1])


@pytest.mark.parametrize(
    "normal, plane",
    [((1, 0, 0), "sagittal"), ((0, -1, 0), "coronal"), ((0, 0, 1), "axial"), ((-0.989, -0.025, 0.144), "sagittal")],
)
def test_dominant_axis_names_the_plane(normal, plane):
    assert plane_from_normal(normal) == plane


def test_plane_from_an_oblique_affine():
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    # In-plane axes along A-P and S-I, slices along L-R, then tilted by 15 degrees.
    affine[:3, :3] = rotation @ np.array([[0, 0, 3.0], [0.5, 0, 0], [0, 0.5, 0]])
    assert plane_from_affine(affine) == "sagittal"


def test_degenerate_geometry_and_unknown_plane():
    with pytest.raises(ValueError):
        slice_normal([1, 0, 0], [2, 0, 0])
    with pytest.raises(OrthodiffError, match="oblique"):
        check_plane("oblique")
