// amct_caffe caffe_patch: BNUpdate layer of update_bn (installed by caffe_patch/install.py).
// Semantics, checks and messages: amct_caffe/runtime/layers/calibration.py (BnUpdateLayer) and
// amct_caffe/io/bn_dump.py (bn_dump_path);
// the statistics arithmetic is batch_norm_layer.cpp's (use_global_stats false), call for call.
#include <stdint.h>

#include <boost/filesystem.hpp>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/bn_update_layer.hpp"
#include "caffe/util/math_functions.hpp"

namespace caffe {

namespace {

// ---- a NumPy .npz (np.savez: a zip archive of .npy files, stored uncompressed) ----

void PutLE(std::string* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

uint32_t Crc32(const std::string& data) {
  static uint32_t table[256];
  static bool ready = false;
  if (!ready) {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      table[n] = c;
    }
    ready = true;
  }
  uint32_t crc = 0xffffffffu;
  for (size_t i = 0; i < data.size(); ++i) {
    crc = table[(crc ^ static_cast<unsigned char>(data[i])) & 0xff] ^ (crc >> 8);
  }
  return crc ^ 0xffffffffu;
}

// One .npy file, format 1.0: magic, header length, the header dict padded with spaces to a
// multiple of 64 bytes (numpy.lib.format's alignment) and ending in '\n', then the data.
std::string Npy(const std::string& descr, const std::string& shape, const std::string& data) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  const size_t prefix = 10;  // "\x93NUMPY", version 1.0, uint16 header length
  dict += std::string((64 - (prefix + dict.size() + 1) % 64) % 64, ' ') + "\n";
  std::string out("\x93NUMPY\x01\x00", 8);
  PutLE(&out, dict.size(), 2);
  return out + dict + data;
}

std::string FloatNpy(const std::vector<float>& values) {
  std::string data;
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t bits;
    memcpy(&bits, &values[i], sizeof(bits));
    PutLE(&data, bits, 4);  // '<f4' whatever the host's byte order
  }
  std::ostringstream shape;
  shape << "(" << values.size() << ",)";
  return Npy("<f4", shape.str(), data);
}

// np.array(str): a 0-d '<U{code points}' array, UTF-32LE.
// The dump file's name for a BatchNorm layer (amct_caffe.io.bn_dump.bn_dump_path): ASCII letters,
// digits, '.', '_' and '-' stay, every other byte of the name becomes %XX (upper-case hex), so two
// layers never share a file and the name can be read back.
std::string DumpFileStem(const std::string& name) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    const bool keep = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '_' || c == '-';
    if (keep) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

std::string UnicodeNpy(const std::string& utf8, const std::string& where) {
  std::string data;
  size_t points = 0;
  for (size_t i = 0; i < utf8.size(); ++points) {
    const unsigned char lead = static_cast<unsigned char>(utf8[i]);
    int extra = -1;  // continuation bytes after the lead byte
    if (lead < 0x80) {
      extra = 0;
    } else if ((lead >> 5) == 0x6) {
      extra = 1;
    } else if ((lead >> 4) == 0xe) {
      extra = 2;
    } else if ((lead >> 3) == 0x1e) {
      extra = 3;
    }
    CHECK(extra >= 0 && i + static_cast<size_t>(extra) < utf8.size())
        << where << "bn_update_param.bn_layer is not valid UTF-8";
    uint32_t cp = extra == 0 ? lead : lead & (0x3f >> extra);
    for (int k = 1; k <= extra; ++k) {
      const unsigned char next = static_cast<unsigned char>(utf8[i + k]);
      CHECK_EQ(next >> 6, 2) << where << "bn_update_param.bn_layer is not valid UTF-8";
      cp = (cp << 6) | (next & 0x3f);
    }
    PutLE(&data, cp, 4);
    i += extra + 1;
  }
  CHECK_GT(points, 0u) << where << "bn_update_param.bn_layer is empty";
  std::ostringstream descr;
  descr << "<U" << points;
  return Npy(descr.str(), "()", data);
}

std::string Int64Npy(int64_t value) {
  std::string data;
  PutLE(&data, static_cast<uint64_t>(value), 8);
  return Npy("<i8", "()", data);
}

// A zip archive of stored members (no compression, as np.savez), dated 1980-01-01.
std::string Zip(const std::vector<std::pair<std::string, std::string> >& members) {
  std::string out, directory;
  for (size_t i = 0; i < members.size(); ++i) {
    const std::string& name = members[i].first;
    const std::string& data = members[i].second;
    CHECK_LT(out.size() + data.size(), 0xffffffffu) << "BNUpdate dump too large for a zip without zip64";
    const uint32_t crc = Crc32(data), offset = static_cast<uint32_t>(out.size());
    std::string common;            // version needed .. extra length, shared by both headers
    PutLE(&common, 20, 2);         // version needed: 2.0
    PutLE(&common, 0, 2);          // flags
    PutLE(&common, 0, 2);          // method: stored
    PutLE(&common, 0, 2);          // time 00:00:00
    PutLE(&common, (1 << 5) | 1, 2);  // date 1980-01-01
    PutLE(&common, crc, 4);
    PutLE(&common, data.size(), 4);  // compressed size
    PutLE(&common, data.size(), 4);  // uncompressed size
    PutLE(&common, name.size(), 2);
    PutLE(&common, 0, 2);          // extra field length
    PutLE(&out, 0x04034b50u, 4);
    out += common + name + data;
    PutLE(&directory, 0x02014b50u, 4);
    PutLE(&directory, 20, 2);      // version made by
    directory += common;
    PutLE(&directory, 0, 2);       // comment length
    PutLE(&directory, 0, 2);       // disk number
    PutLE(&directory, 0, 2);       // internal attributes
    PutLE(&directory, 0, 4);       // external attributes
    PutLE(&directory, offset, 4);
    directory += name;
  }
  const uint32_t start = static_cast<uint32_t>(out.size());
  out += directory;
  PutLE(&out, 0x06054b50u, 4);
  PutLE(&out, 0, 2);  // this disk
  PutLE(&out, 0, 2);  // disk of the central directory
  PutLE(&out, members.size(), 2);
  PutLE(&out, members.size(), 2);
  PutLE(&out, directory.size(), 4);
  PutLE(&out, start, 4);
  PutLE(&out, 0, 2);  // comment length
  return out;
}

// BatchNorm's channel count: axis 1, or 1 for a one-axis bottom.
template <typename Dtype>
int Channels(const Blob<Dtype>& b) { return b.num_axes() == 1 ? 1 : b.shape(1); }

}  // namespace

template <typename Dtype>
void BNUpdateLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                      const vector<Blob<Dtype>*>& top) {
  const BNUpdateParameter& p = this->layer_param_.bn_update_param();
  const std::string where = amct::Where(this->layer_param_) + "bn_update_param";
  CHECK(!p.bn_layer().empty()) << where << ".bn_layer is empty";
  CHECK_GE(p.iterations(), 1u) << where << ".iterations must be >= 1, got " << p.iterations();
  CHECK(p.moving_average_fraction() > 0 && p.moving_average_fraction() < 1)
      << where << ".moving_average_fraction must be in (0, 1), got "
      << amct::ProtoFloat(p.moving_average_fraction());
  CHECK(!p.dump_dir().empty()) << where << ".dump_dir is empty";
  bn_layer_ = p.bn_layer();
  UnicodeNpy(bn_layer_, amct::Where(this->layer_param_));  // a name the dump cannot hold fails now, not at the end
  iterations_ = p.iterations();
  fraction_ = p.moving_average_fraction();
  dump_file_ = (boost::filesystem::path(p.dump_dir()) / (DumpFileStem(bn_layer_) + ".npz")).string();
  seen_ = 0;
  channels_ = Channels(*bottom[0]);
  if (this->blobs_.size() > 0) {
    CHECK_EQ(this->blobs_.size(), 3u) << amct::Where(this->layer_param_)
        << "needs 3 blobs (mean, variance, moving-average factor), got " << this->blobs_.size();
  } else {  // no weights given: BatchNorm's zero statistics
    this->blobs_.resize(3);
    vector<int> sz(1, channels_);
    this->blobs_[0].reset(new Blob<Dtype>(sz));
    this->blobs_[1].reset(new Blob<Dtype>(sz));
    sz[0] = 1;
    this->blobs_[2].reset(new Blob<Dtype>(sz));
    for (int i = 0; i < 3; ++i) {
      caffe_set(this->blobs_[i]->count(), Dtype(0), this->blobs_[i]->mutable_cpu_data());
    }
  }
}

template <typename Dtype>
void BNUpdateLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                                   const vector<Blob<Dtype>*>& top) {
  channels_ = Channels(*bottom[0]);
  CHECK_EQ(this->blobs_[0]->count(), channels_) << amct::Where(this->layer_param_) << "the bottom has "
      << channels_ << " channels, the statistics blobs " << this->blobs_[0]->count();
  CHECK_EQ(this->blobs_[1]->count(), channels_) << amct::Where(this->layer_param_) << "the bottom has "
      << channels_ << " channels, the variance blob " << this->blobs_[1]->count();
  CHECK_EQ(this->blobs_[2]->count(), 1) << amct::Where(this->layer_param_)
      << "the moving-average factor blob must hold 1 value, got " << this->blobs_[2]->count();
  vector<int> sz(1, channels_);
  mean_.Reshape(sz);
  variance_.Reshape(sz);
  temp_.ReshapeLike(*bottom[0]);
  sz[0] = bottom[0]->shape(0);
  batch_sum_multiplier_.Reshape(sz);
  caffe_set(batch_sum_multiplier_.count(), Dtype(1), batch_sum_multiplier_.mutable_cpu_data());
  sz[0] = bottom[0]->count() / (channels_ * bottom[0]->shape(0));
  spatial_sum_multiplier_.Reshape(sz);
  caffe_set(spatial_sum_multiplier_.count(), Dtype(1), spatial_sum_multiplier_.mutable_cpu_data());
  sz[0] = channels_ * bottom[0]->shape(0);
  num_by_chans_.Reshape(sz);
}

template <typename Dtype>
void BNUpdateLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
                                       const vector<Blob<Dtype>*>& top) {
  if (seen_ >= iterations_) return;
  const Dtype* bottom_data = bottom[0]->cpu_data();
  Dtype* centered = temp_.mutable_cpu_data();
  const int num = bottom[0]->shape(0);
  const int spatial_dim = bottom[0]->count() / (num * channels_);
  // BatchNormLayer<Dtype>::Forward_cpu without use_global_stats, its top replaced by temp_.
  caffe_cpu_gemv<Dtype>(CblasNoTrans, channels_ * num, spatial_dim, 1. / (num * spatial_dim), bottom_data,
                        spatial_sum_multiplier_.cpu_data(), 0., num_by_chans_.mutable_cpu_data());
  caffe_cpu_gemv<Dtype>(CblasTrans, num, channels_, 1., num_by_chans_.cpu_data(),
                        batch_sum_multiplier_.cpu_data(), 0., mean_.mutable_cpu_data());
  caffe_copy(bottom[0]->count(), bottom_data, centered);
  caffe_cpu_gemm<Dtype>(CblasNoTrans, CblasNoTrans, num, channels_, 1, 1, batch_sum_multiplier_.cpu_data(),
                        mean_.cpu_data(), 0., num_by_chans_.mutable_cpu_data());
  caffe_cpu_gemm<Dtype>(CblasNoTrans, CblasNoTrans, channels_ * num, spatial_dim, 1, -1,
                        num_by_chans_.cpu_data(), spatial_sum_multiplier_.cpu_data(), 1., centered);
  // (x - mean)^2 in place: an elementwise map, so the same values as BatchNorm's top -> temp_.
  caffe_powx(temp_.count(), centered, Dtype(2), centered);
  caffe_cpu_gemv<Dtype>(CblasNoTrans, channels_ * num, spatial_dim, 1. / (num * spatial_dim), centered,
                        spatial_sum_multiplier_.cpu_data(), 0., num_by_chans_.mutable_cpu_data());
  caffe_cpu_gemv<Dtype>(CblasTrans, num, channels_, 1., num_by_chans_.cpu_data(),
                        batch_sum_multiplier_.cpu_data(), 0., variance_.mutable_cpu_data());
  this->blobs_[2]->mutable_cpu_data()[0] *= fraction_;
  this->blobs_[2]->mutable_cpu_data()[0] += 1;
  caffe_cpu_axpby(mean_.count(), Dtype(1), mean_.cpu_data(), fraction_, this->blobs_[0]->mutable_cpu_data());
  const int m = bottom[0]->count() / channels_;
  const Dtype bias_correction_factor = m > 1 ? Dtype(m) / (m - 1) : 1;
  caffe_cpu_axpby(variance_.count(), bias_correction_factor, variance_.cpu_data(), fraction_,
                  this->blobs_[1]->mutable_cpu_data());
  ++seen_;
  LOG(INFO) << "BNUpdate '" << this->layer_param_.name() << "': batch " << seen_ << "/" << iterations_
            << " applied to '" << bn_layer_ << "'";
  if (seen_ == iterations_) Dump();
}

template <typename Dtype>
void BNUpdateLayer<Dtype>::Dump() {
  // float32 like the executor's dump; for Dtype = double the division is done in double first.
  const Dtype factor = this->blobs_[2]->cpu_data()[0];
  const Dtype* mean = this->blobs_[0]->cpu_data();
  const Dtype* variance = this->blobs_[1]->cpu_data();
  std::vector<float> m(channels_), v(channels_);
  for (int c = 0; c < channels_; ++c) {
    m[c] = static_cast<float>(mean[c] / factor);
    v[c] = static_cast<float>(variance[c] / factor);
  }
  std::vector<std::pair<std::string, std::string> > members;  // np.savez's order: its keyword order
  members.push_back(std::make_pair("mean.npy", FloatNpy(m)));
  members.push_back(std::make_pair("var.npy", FloatNpy(v)));
  members.push_back(std::make_pair("bn_layer.npy",
                                   UnicodeNpy(bn_layer_, amct::Where(this->layer_param_))));
  members.push_back(std::make_pair("iterations.npy", Int64Npy(iterations_)));
  amct::WriteFileAtomically(dump_file_, Zip(members));
  LOG(INFO) << "BNUpdate '" << this->layer_param_.name() << "': statistics of BatchNorm '" << bn_layer_
            << "' refreshed over " << iterations_ << " batch(es), written to " << dump_file_;
}

INSTANTIATE_CLASS(BNUpdateLayer);
REGISTER_LAYER_CLASS(BNUpdate);

}  // namespace caffe
