"""Full-resolution outputs in torch, slab by slab: dense displacement of an affine + displacement-field composite,
and an image warped by a dense displacement.

They give what ITK gives for ``sitk.TransformToDisplacementField`` of a ``CompositeTransform`` of an
``AffineTransform`` and a ``DisplacementFieldTransform``, and for ``ResampleImageFilter`` with linear
interpolation (tested against ITK on grids with non-identity directions and anisotropic spacing: 1e-4 mm,
1 HU), but vectorised, multi-threaded by torch and on the GPU when the pipeline runs there: ITK's resampling
through a composite transform is single-threaded per point and was the slowest part of a clinical-size run.

Conventions (ITK's): points are LPS mm; a transform maps points of the output grid to points of the input; a
displacement field is linearly interpolated inside its voxels' extent (continuous index in ``[-0.5, n - 0.5)``,
neighbours clamped at the border) and is zero outside it; an image sampled outside its extent gives the default
value; integer images are written by truncation towards zero after clamping to the type's range.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from deepabdominalreg.geometry import Grid, affine_matrix
from deepabdominalreg.io import writable_array_view
from deepabdominalreg.spatial import invert_displacement_at, normalising_scale

__all__ = ["affine_field_displacement", "inverse_field_on_grid", "warp_image"]

_SLAB_VOXELS = 1 << 20  # voxels per slab: slabs bound the temporaries' memory, whatever the image's size


def _slab_size(grid: Grid, slab: int | None) -> int:
    return max(1, int(slab) if slab else _SLAB_VOXELS // max(grid.size[0] * grid.size[1], 1))


def _index_map(matrix: np.ndarray, grid: Grid, device: torch.device,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """An affine map of ``grid``'s voxel indices (4x4 homogeneous ``matrix`` on ``(i, j, k, 1)``, float64) as its
    values on the ``k = 0`` plane ``(ny, nx, 3)`` and its step per slice ``(3,)``: slice ``k`` is
    ``plane + k * step``."""
    columns = [torch.as_tensor(matrix[:3, a], dtype=dtype, device=device) for a in range(4)]
    plane = (torch.arange(grid.size[1], device=device, dtype=dtype)[:, None, None] * columns[1]
             + torch.arange(grid.size[0], device=device, dtype=dtype)[:, None] * columns[0] + columns[3])
    return plane, columns[2]


def _slices(z0: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Slice indices ``z0 .. z0 + n`` shaped ``(n, 1, 1, 1)`` to scale an :func:`_index_map` step."""
    return torch.arange(z0, z0 + n, device=device, dtype=dtype)[:, None, None, None]


def _inside(index: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Whether continuous indices ``(..., 3)`` (``i, j, k``) lie inside the voxels' extent ``[-0.5, n - 0.5)``."""
    upper = torch.tensor([float(s) - 0.5 for s in size], device=index.device, dtype=index.dtype)
    return ((index >= -0.5) & (index < upper)).all(dim=-1)


def _normalised(index: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``grid_sample`` coordinates (``align_corners=True``) of continuous indices ``(..., 3)`` (``i, j, k``)."""
    return index * normalising_scale(size, index.device, index.dtype) - 1.0


def _axis_weights(scale: float, offset: float, n_out: int, n_in: int, start: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-interpolation taps along one axis for output indices ``start .. start + n_out``, which map to input
    continuous index ``scale * p + offset``: lower neighbour index and the two weights (both zero outside the
    input's extent ``[-0.5, n_in - 0.5)``; neighbours clamped at the border, as ITK)."""
    p = torch.arange(start, start + n_out, device=device, dtype=torch.float64)
    c = scale * p + offset
    inside = (c >= -0.5) & (c < n_in - 0.5)
    c = c.clamp(0.0, max(n_in - 1.0, 0.0))
    lower = c.floor().clamp(max=max(n_in - 2, 0))
    t = (c - lower) if n_in > 1 else torch.zeros_like(c)
    mask = inside.to(torch.float64)
    upper_index = (lower + 1).clamp(max=n_in - 1)
    return (torch.stack([lower, upper_index]).long(),
            ((1.0 - t) * mask).float(), (t * mask).float())


def _interpolate_axis(volume: torch.Tensor, dim: int, taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                      ) -> torch.Tensor:
    """Linear interpolation of ``volume`` along ``dim`` with :func:`_axis_weights`' taps."""
    index, w0, w1 = taps
    shape = [1] * volume.dim()
    shape[dim] = -1
    return (volume.index_select(dim, index[0]) * w0.view(shape)
            + volume.index_select(dim, index[1]) * w1.view(shape))


def affine_field_displacement(
    grid: Grid,
    field_mm_zyx3: np.ndarray | torch.Tensor,
    field_grid: Grid,
    *,
    before: sitk.AffineTransform | None = None,
    after: sitk.AffineTransform | None = None,
    device: torch.device | str = "cpu",
    slab: int | None = None,
) -> sitk.Image:
    """``T(x) - x`` at every voxel ``x`` of ``grid`` as a ``sitkVectorFloat32`` image (LPS mm), for
    ``T(x) = after(q + u(q))`` with ``q = before(x)`` and ``u`` the displacement field ``field_mm_zyx3``
    (``(D, H, W, 3)`` LPS mm on ``field_grid``; zero outside it).

    ``sitk.CompositeTransform([after, field])`` is ``before=None``; ``CompositeTransform([field, before])`` is
    ``after=None`` (ITK applies a composite's last transform first).  Written straight into the output image's
    buffer: one z-slice at a time when the field grid has ``grid``'s axes (separable interpolation), else ``slab``
    z-slices at a time (default: ~1 M voxels) through a trilinear sample per voxel.
    """
    device = torch.device(device)
    field = torch.as_tensor(field_mm_zyx3, dtype=torch.float32, device=device)
    if field.shape != (*field_grid.shape_zyx, 3):
        raise ValueError(f"field shape {tuple(field.shape)} does not match its grid {field_grid.shape_zyx} x 3")
    pre, post = affine_matrix(before), affine_matrix(after)
    to_lps = grid.index_to_physical_matrix()
    # every map is affine in the output voxel index: evaluate each as one matrix (float64), apply in float32
    to_field_index = field_grid.physical_to_index_matrix() @ pre @ to_lps
    offset = post @ pre @ to_lps - to_lps  # T(x) - x when the field is zero
    # after(q + u) - x = offset(x) + L_after u: apply L_after to the (coarse) field once
    field = field @ torch.as_tensor(post[:3, :3], dtype=torch.float32, device=device).T
    # the same axes as the field's grid (the pipeline's fixed image and its working grid): the interpolation is
    # separable, one axis at a time on the coarse field, instead of a trilinear sample per output voxel
    # (directions read from files agree to ~1e-7, not exactly: ignore off-diagonal terms worth < 1e-3 field voxel)
    off_diagonal = np.abs(to_field_index[:3, :3] - np.diag(np.diag(to_field_index[:3, :3]))).max()
    separable = off_diagonal * max(grid.size) < 1e-3
    if not separable:
        field_channels_first = field.permute(3, 0, 1, 2).unsqueeze(0).contiguous()  # (1, 3, D, H, W)

    image = grid.apply_to(sitk.Image([int(v) for v in grid.size], sitk.sitkVectorFloat32, 3))
    out = writable_array_view(image)
    nx, ny, nz = grid.size
    fx, fy, fz = field_grid.size
    on_cpu = device.type == "cpu"
    with torch.no_grad():
        # offset(x) = i c_i + j c_j + k c_k + b: the (j, i) plane once, c_k per slice
        plane_offset, offset_step = _index_map(offset, grid, device)
        if separable:
            # per output slice: the field's planes interpolated in-plane (each used by several slices: cached),
            # then linearly in z, written straight into the output buffer
            diag, shift = np.diag(to_field_index[:3, :3]), to_field_index[:3, 3]
            taps_x = _axis_weights(diag[0], shift[0], nx, fx, 0, device)
            taps_y = _axis_weights(diag[1], shift[1], ny, fy, 0, device)
            index_z, w0_z, w1_z = (t.cpu().tolist() for t in _axis_weights(diag[2], shift[2], nz, fz, 0, device))
            cache: dict[int, torch.Tensor] = {}
            # output slice z samples the field at plane c = diag_z z + shift_z; plane a is cached with the affine's
            # offset at the slice that would sample it exactly, zeta_a = (a - shift_z) / diag_z, so that one
            # interpolation of two planes gives the offset of the slices between them too (linear in z)
            zeta = (lambda a: (a - shift[2]) / diag[2]) if diag[2] != 0 else (lambda a: 0.0)

            def plane(a: int) -> torch.Tensor:
                """Field plane ``a`` interpolated in-plane, plus the affine's offset at slice ``zeta(a)``."""
                if a not in cache:
                    if len(cache) >= 2:  # the oldest plane (slices visit the field's planes in order)
                        cache.pop(next(iter(cache)))
                    cache[a] = (_interpolate_axis(_interpolate_axis(field[a], 1, taps_x), 0, taps_y)
                                .add_(plane_offset).add_(offset_step * float(zeta(a))))
                return cache[a]

            for z in range(nz):
                target = torch.from_numpy(out[z]) if on_cpu else torch.empty((ny, nx, 3), device=device)
                a, b, w0, w1 = index_z[0][z], index_z[1][z], w0_z[z], w1_z[z]
                if w0 == 0.0 and w1 == 0.0:  # outside the field's extent: the affine alone
                    torch.add(plane_offset, offset_step * float(z), out=target)
                else:  # inside, w0 + w1 = 1: one interpolation pass gives field and offset
                    torch.lerp(plane(a), plane(b), w1, out=target)
                    # slices where the field is clamped (its border half-voxels) sample the planes elsewhere
                    residual = z - ((1.0 - w1) * zeta(a) + w1 * zeta(b))
                    if abs(residual) > 1e-6:
                        target.add_(offset_step * float(residual))
                if not on_cpu:
                    out[z] = target.cpu().numpy()
        else:
            step = _slab_size(grid, slab)
            field_plane, field_step = _index_map(to_field_index, grid, device)
            for z0 in range(0, nz, step):
                n = min(step, nz - z0)
                ks = _slices(z0, n, device)
                field_index = field_plane + ks * field_step
                inside = _inside(field_index, field_grid.size)
                sampled = F.grid_sample(field_channels_first, _normalised(field_index, field_grid.size).unsqueeze(0),
                                        mode="bilinear", padding_mode="border", align_corners=True)[0]
                displacement = sampled.permute(1, 2, 3, 0).mul_(inside.unsqueeze(-1))
                displacement += plane_offset
                displacement += ks * offset_step
                out[z0: z0 + n] = displacement.cpu().numpy()
    del out
    return image


def inverse_field_on_grid(
    disp: torch.Tensor,
    inverse: torch.Tensor,
    working_grid: Grid,
    affine: sitk.AffineTransform,
    grid: Grid,
    *,
    iterations: int = 20,
    tolerance: float = 1e-2,
) -> torch.Tensor:
    """The inverse of the transform ``x -> affine(x + u(x))`` (``u``: ``disp``, voxels of ``working_grid``) on
    another grid: ``y -> affine^-1(y) + v(affine^-1(y))``, written as ``affine^-1(y + w(y))`` with ``w`` ``(D, H, W,
    3)`` float32 LPS mm at the voxels ``y`` of ``grid``.

    With ``grid`` on the moving image's axes (a working grid of it), :func:`affine_field_displacement` ``(moving grid,
    w, grid, after=affine^-1)`` gives the full-resolution inverse by separable interpolation, where the same map
    through ``working_grid`` needs a 3-channel trilinear sample per voxel (far more work for a clinical CT).
    ``disp``: ``(1, 3, D, H, W)`` (channels ``d, h, w``); ``inverse``: its inverse on ``working_grid``
    (:func:`spatial.invert_displacement`), the first guess.  ``v`` is solved at each point
    (:func:`spatial.invert_displacement_at`, to ``tolerance`` working voxels), so it is the inverse at ``grid``'s
    voxels, as accurate as ``inverse`` at the working voxels; ``v = 0`` where ``affine^-1(y)`` lies outside the
    working grid's extent (ITK's displacement fields are zero there, and so is the forward field).
    """
    device, dtype = disp.device, disp.dtype
    # continuous working-grid index (i, j, k) of q = affine^-1(y) for every voxel y of grid: affine in y's index
    to_working = working_grid.physical_to_index_matrix() @ affine_matrix(affine.GetInverse()) \
        @ grid.index_to_physical_matrix()
    plane, step = _index_map(to_working, grid, device, dtype)
    q_ijk = plane + _slices(0, grid.size[2], device, dtype) * step
    inside = _inside(q_ijk, working_grid.size)
    points = q_ijk.flip(-1).permute(3, 0, 1, 2).unsqueeze(0)  # voxel coordinates (d, h, w)
    initial = F.grid_sample(inverse, _normalised(q_ijk, working_grid.size).unsqueeze(0), mode="bilinear",
                            padding_mode="border", align_corners=True)
    del q_ijk
    with torch.no_grad():
        v = invert_displacement_at(disp, points, initial, iterations=iterations, tolerance=tolerance)
        v.mul_(inside)
        # working voxels (d, h, w) -> LPS mm, then w = L v (affine^-1(y + w) = affine^-1(y) + L^-1 w)
        linear = np.asarray(affine.GetMatrix(), dtype=np.float64).reshape(3, 3)
        to_mm = linear @ working_grid.direction_matrix @ np.diag(working_grid.spacing)
        to_mm = torch.as_tensor(to_mm[:, ::-1].copy(), dtype=dtype, device=device)  # columns for (d, h, w)
        return v[0].permute(1, 2, 3, 0) @ to_mm.T


def _integer_range(array: np.ndarray) -> tuple[float, float] | None:
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        return float(info.min), float(info.max)
    return None


def warp_image(
    image: sitk.Image,
    displacement: sitk.Image,
    *,
    default_value: float = 0.0,
    interpolator: str = "linear",
    device: torch.device | str = "cpu",
    slab: int | None = None,
) -> sitk.Image:
    """``image`` sampled at ``x + d(x)`` for every voxel ``x`` of ``displacement``'s grid, where ``d`` is the
    ``sitkVectorFloat32``/``64`` displacement image (LPS mm); ``default_value`` outside ``image``.

    ``interpolator``: ``"linear"`` (trilinear) or ``"nearest"`` (label maps: the voxel whose index is the continuous
    index rounded half up, as ITK's nearest-neighbour interpolator does).
    The output has ``displacement``'s grid and ``image``'s pixel type (scalar images only).  Only the part of
    ``image`` that a slab maps into is converted at a time.  Integer images are sampled in float64 and their values
    truncated as ITK does, after snapping values within 1e-6 of an integer to it: in float32 an exact 100 HU can come
    out as 99.99 and so 99 HU, so that even an identity warp would change many voxels by 1 HU.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("warp_image warps scalar images; warp each component of a vector image separately")
    if interpolator not in ("linear", "nearest"):
        raise ValueError(f"interpolator must be 'linear' or 'nearest', got {interpolator!r}")
    device = torch.device(device)
    grid = Grid.from_image(displacement)
    source_grid = Grid.from_image(image)
    source = sitk.GetArrayViewFromImage(image)
    limits = _integer_range(source)
    use_nearest = interpolator == "nearest"
    dtype = torch.float64 if (limits is not None or use_nearest) else torch.float32
    to_source_index = source_grid.physical_to_index_matrix()
    voxel_to_source = to_source_index @ grid.index_to_physical_matrix()
    displacement_to_index = to_source_index[:3, :3]
    field = sitk.GetArrayViewFromImage(displacement)
    source_size = source_grid.size

    output = sitk.Image([int(v) for v in grid.size], image.GetPixelID())
    output = grid.apply_to(output)
    out = writable_array_view(output)
    step = _slab_size(grid, slab)
    depth = source.shape[0]
    nz = grid.size[2]
    # the source index of voxel (i, j, k) before the displacement: i * c_i + j * c_j + k * c_k + b
    source_plane, source_step = _index_map(voxel_to_source, grid, device, dtype)
    with torch.no_grad():
        for z0 in range(0, nz, step):
            n = min(step, nz - z0)
            d = torch.as_tensor(np.array(field[z0: z0 + n]), device=device)
            if d.dtype == torch.float64:  # a float64 field with a float32 image: the image's precision
                d = d.to(dtype)
            # each source index component (i, j, k) as its own contiguous array: + M d, skipping the zeros of M
            # (axis-aligned grids: one term), and the inside test per component (a reduction over a last axis of 3,
            # `all(dim=-1)`, took as long as the trilinear sampling's index arithmetic)
            ks = _slices(z0, n, device, dtype)[..., 0]
            index = []
            inside = None
            for a in range(3):
                component = source_plane[..., a] + ks * source_step[a]
                for b in range(3):
                    if displacement_to_index[a, b] != 0.0:
                        component.add_(d[..., b], alpha=float(displacement_to_index[a, b]))
                index.append(component)
                ok = (component >= -0.5) & (component < source_size[a] - 0.5)
                inside = ok if inside is None else inside.logical_and_(ok)
            del d
            if not bool(inside.any()):  # the whole slab maps outside the image (e.g. beyond its last slice)
                out[z0: z0 + n] = default_value
                continue
            # the source slices the trilinear weights can touch (clamped: outside voxels get the default anyway)
            k0 = max(int(np.floor(max(float(index[2].min()), -0.5))), 0)
            k1 = min(int(np.floor(min(float(index[2].max()), depth - 0.5))) + 2, depth)
            if use_nearest:
                out[z0: z0 + n] = _nearest_values(source[k0:k1], index, k0, inside, default_value)
                continue
            block = torch.as_tensor(np.array(source[k0:k1]), device=device, dtype=dtype)[None, None]
            # grid_sample's coordinates (align_corners=True) on the block of source slices k0 .. k1 - 1
            scale = normalising_scale((source_size[0], source_size[1], k1 - k0), dtype=torch.float64).tolist()
            location = torch.empty((1, *index[0].shape, 3), device=device, dtype=dtype)
            for a in range(3):
                shift = 1.0 + (scale[a] * k0 if a == 2 else 0.0)
                torch.mul(index[a], scale[a], out=location[0, ..., a]).sub_(shift)
            del index
            sampled = F.grid_sample(block, location, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
            values = sampled.masked_fill_(~inside, float(default_value))
            if limits is not None:
                # ITK truncates; a value within float64 rounding of an integer (an exact 100 HU sampled as
                # 99.9999999999999) is that integer, as ITK computes it
                nearest = values.round()
                values = torch.where((values - nearest).abs() < 1e-6, nearest, values).clamp_(*limits).trunc_()
            out[z0: z0 + n] = values.cpu().numpy().astype(out.dtype, copy=False)
    del out
    return output


def _nearest_values(block: np.ndarray, index: list[torch.Tensor], k0: int, inside: torch.Tensor,
                    default_value: float) -> np.ndarray:
    """Values of ``block`` (the source slices ``k0...``, ``zyx``) at the voxels nearest to continuous source indices
    ``index`` (the ``i``, ``j``, ``k`` arrays), rounded half up as ITK does; ``default_value`` where not ``inside``."""
    depth, height, width = block.shape
    i = torch.floor(index[0] + 0.5).long().clamp_(0, width - 1)
    j = torch.floor(index[1] + 0.5).long().clamp_(0, height - 1)
    k = (torch.floor(index[2] + 0.5).long() - k0).clamp_(0, depth - 1)
    flat = ((k * height + j) * width + i).cpu().numpy()
    values = np.ascontiguousarray(block).reshape(-1)[flat]
    values[~inside.cpu().numpy()] = np.asarray(default_value).astype(values.dtype)
    return values
