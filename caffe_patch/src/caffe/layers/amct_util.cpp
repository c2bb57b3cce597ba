// amct_caffe caffe_patch: shared helpers of the AMCT layers (installed by caffe_patch/install.py).
#include <google/protobuf/text_format.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "amct/capi.h"
#include "caffe/layers/amct_util.hpp"

namespace caffe {
namespace amct {

double ProtoFloat(float value) {
  // The shortest "%.{p}g" that reads back as the same float is the closest shortest decimal,
  // i.e. what Python's str(numpy.float32(value)) prints.
  char text[40];
  for (int precision = 1; precision <= 9; ++precision) {
    snprintf(text, sizeof(text), "%.*g", precision, static_cast<double>(value));
    if (strtof(text, NULL) == value) break;
  }
  return strtod(text, NULL);
}

std::string Where(const LayerParameter& param) {
  return "layer '" + param.name() + "' (" + param.type() + "): ";
}

void CheckQuant(int status, const LayerParameter& param) {
  if (status != AMCT_OK) {
    LOG(FATAL) << Where(param) << amct_last_error();
  }
}

bool ReadRecord(const std::string& path, ScaleOffsetRecord* record) {
  if (!boost::filesystem::exists(path)) return false;
  std::ifstream in(path.c_str());
  CHECK(in) << "cannot read record file " << path;
  std::stringstream text;
  text << in.rdbuf();
  ScaleOffsetRecord parsed;
  CHECK(google::protobuf::TextFormat::ParseFromString(text.str(), &parsed))
      << path << ": not a valid scale/offset record (ScaleOffsetRecord in protobuf text format)";
  record->Swap(&parsed);
  return true;
}

void WriteRecord(const ScaleOffsetRecord& record, const std::string& path) {
  std::string text;
  CHECK(google::protobuf::TextFormat::PrintToString(record, &text));
  WriteFileAtomically(path, text);
}

void WriteFileAtomically(const std::string& path, const std::string& data) {
  boost::filesystem::path target(path);
  boost::filesystem::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  boost::filesystem::create_directories(dir);
  std::string tmpl = (dir / ("." + target.filename().string() + ".XXXXXX")).string();
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  const int fd = mkstemp(name.data());
  CHECK_GE(fd, 0) << "cannot create a temporary file beside " << path << ": " << strerror(errno);
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    const ssize_t n = write(fd, p, left);
    if (n < 0) {
      close(fd);
      unlink(name.data());
      LOG(FATAL) << "cannot write " << path << ": " << strerror(errno);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  close(fd);
  // mkstemp creates 0600; give the file the usual permissions.
  const mode_t mask = umask(0);
  umask(mask);
  chmod(name.data(), 0666 & ~mask);
  if (rename(name.data(), path.c_str()) != 0) {
    unlink(name.data());
    LOG(FATAL) << "cannot replace " << path << ": " << strerror(errno);
  }
}

IfmrSettings ReadIfmrSettings(const IFMRParameter& p, const LayerParameter& layer) {
  const std::string where = Where(layer);
  CHECK_GE(p.batch_num(), 1) << where << "ifmr_param.batch_num must be >= 1, got " << p.batch_num();
  CHECK(!p.record_file_path().empty()) << where << "ifmr_param.record_file_path is empty";
  CHECK_GT(p.object_layer_size(), 0) << where << "ifmr_param names no quantized layer";
  IfmrSettings s;
  s.batch_num = static_cast<int>(p.batch_num());
  s.num_bits = static_cast<int>(p.num_bits());
  s.with_offset = p.with_offset();
  s.max_percentile = ProtoFloat(p.max_percentile());
  s.min_percentile = ProtoFloat(p.min_percentile());
  s.start = ProtoFloat(p.search_range_start());
  s.end = ProtoFloat(p.search_range_end());
  s.step = ProtoFloat(p.search_step());
  // The checks of amct_caffe.quant.IfmrParams, on the same decimal values.
  CHECK(s.num_bits >= 8 && s.num_bits <= 16) << where
      << "IFMR activation_quant_params: num_bits must be an integer in [8, 16], got " << s.num_bits;
  CHECK(s.max_percentile > 0.5 && s.max_percentile <= 1.0)
      << where << "IFMR max_percentile must be in (0.5, 1], got " << s.max_percentile;
  CHECK(s.min_percentile > 0.5 && s.min_percentile <= 1.0)
      << where << "IFMR min_percentile must be in (0.5, 1], got " << s.min_percentile;
  CHECK(0 < s.start && s.start < s.end) << where << "IFMR search_range must satisfy 0 < start < end, got ["
      << s.start << ", " << s.end << "]";
  CHECK(0 < s.step && s.step <= s.end - s.start) << where << "IFMR search_step must be in (0, "
      << s.end - s.start << "] (end - start), got " << s.step;
  return s;
}

void IfmrSearch(const IfmrSettings& s, const std::vector<std::vector<float> >& batches,
                const LayerParameter& layer, float* scale, int* offset) {
  std::vector<const float*> chunks;
  std::vector<size_t> sizes;
  for (size_t i = 0; i < batches.size(); ++i) {
    chunks.push_back(batches[i].data());
    sizes.push_back(batches[i].size());
  }
  int best = 0;
  CheckQuant(amct_ifmr_search(chunks.data(), sizes.data(), chunks.size(), s.num_bits, s.with_offset ? 1 : 0,
                              s.max_percentile, s.min_percentile, s.start, s.end, s.step, scale, offset,
                              &best), layer);
}

std::string FloatText(float value) {
  char text[32];
  snprintf(text, sizeof(text), "%.9g", value);
  return text;
}

SingleLayerRecord* LayerEntry(ScaleOffsetRecord* record, const std::string& layer, bool create) {
  SingleLayerRecord* found = NULL;
  for (int i = 0; i < record->record_size(); ++i) {
    if (record->record(i).key() == layer) found = record->mutable_record(i)->mutable_value();
  }
  if (found == NULL && create) {
    ScaleOffsetRecord_MapFiledEntry* entry = record->add_record();
    entry->set_key(layer);
    found = entry->mutable_value();
  }
  return found;
}

ActivationQuantParam* ActivationEntry(SingleLayerRecord* entry, int index, bool create) {
  for (int i = 0; i < entry->record_d_size(); ++i) {
    if (entry->record_d(i).index() == index) return entry->mutable_record_d(i);
  }
  if (!create) return NULL;
  ActivationQuantParam* item = entry->add_record_d();
  item->set_index(index);
  return item;
}

void ChannelsHeightWidth(const std::vector<int>& shape, int* c, int* h, int* w) {
  *c = shape.size() > 1 ? shape[1] : 1;
  *h = shape.size() > 2 ? shape[2] : 1;
  long long rest = 1;  // NOLINT(runtime/int)
  for (size_t i = 3; i < shape.size(); ++i) rest *= shape[i];
  *w = static_cast<int>(rest);
}

std::string ShapeString(const std::vector<int>& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) out << ",";
  out << ")";
  return out.str();
}

}  // namespace amct
}  // namespace caffe
