// What both routers' argument checks share: one-line Python errors that name the module's
// entry point, and int64 size arithmetic that raises instead of wrapping around.
//
// Define KCAP_WHO (the entry point, e.g. "kcap._router_cpu.route: ") before including this.
// Everything here has internal linkage: each module gets its own copy.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#ifndef KCAP_WHO
#error "define KCAP_WHO before including arg_errors.h"
#endif

namespace {

const std::string kWho = KCAP_WHO;

[[noreturn]] void bad_value(const std::string& msg) { throw pybind11::value_error(kWho + msg); }
[[noreturn]] void bad_type(const std::string& msg) { throw pybind11::type_error(kWho + msg); }

int64_t mul(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) bad_value("sizes overflow int64 (T, E, k or block too large)");
  return r;
}

int64_t add(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) bad_value("sizes overflow int64 (T, E, k or block too large)");
  return r;
}

}  // namespace
