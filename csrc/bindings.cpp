// The extension module ncfast._C: each op family registers its kernels here.
#include "common.h"

namespace ncfast {

namespace {

py::buffer_info checked_info(const py::buffer& buffer, const char* name, int ndim, size_t itemsize, bool writable) {
  py::buffer_info info = buffer.request(writable);
  if (info.ndim != ndim) {
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) +
                          "-D buffer, got " + std::to_string(info.ndim) + "-D");
  }
  if (static_cast<size_t>(info.itemsize) != itemsize) {
    throw py::value_error(std::string(name) + ": expected items of " + std::to_string(itemsize) +
                          " bytes, got " + std::to_string(info.itemsize));
  }
  for (int d = 0; d < ndim; ++d) {
    if (info.strides[d] % info.itemsize != 0)
      throw py::value_error(std::string(name) + ": strides must be whole elements");
  }
  return info;
}

}  // namespace

View view_of(const py::buffer& buffer, const char* name, int ndim, size_t itemsize, bool writable) {
  py::buffer_info info = checked_info(buffer, name, ndim, itemsize, writable);
  View v;
  v.data = info.ptr;
  v.rows = info.shape[0];
  v.row_stride = info.strides[0] / info.itemsize;
  if (ndim == 2) {
    v.cols = info.shape[1];
    v.col_stride = info.strides[1] / info.itemsize;
    if (v.col_stride != 1 && v.cols > 1) {
      throw py::value_error(std::string(name) + ": rows must be contiguous (column stride 1)");
    }
  }
  return v;
}

}  // namespace ncfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "ncfast CPU kernels (plain buffers in, plain buffers out; no torch)";
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  ncfast::register_losses(m);
  ncfast::register_ncstats(m);
}
