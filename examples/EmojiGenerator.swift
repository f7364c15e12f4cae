// EmojiGenerator.swift - run an mlxflow emoji denoiser (.mlpackage) with Core ML.
//
// Inputs of the exported model (Float32 MLMultiArrays):
//   x_t (B,3,H,W) in ~[-1,1], t (B,) with t=0 noise / t=1 data, text (B,L,D)  -> velocity (B,3,H,W)
// B = 1 or 2 (batch 2 = CFG's conditional + unconditional halves in one call).
// The label table (labels.json + label_embeddings.bin from convert.coreml.export_label_table)
// holds one (L,D) text embedding per training label, so no text encoder is needed on device.
//
// Usage:
//   let gen = try await EmojiGenerator(modelURL: packageURL, labelsFolder: labelsURL)
//   let image = try gen.generate(label: "red heart", steps: 20, guidance: 7.5)   // CGImage
//
// Requires iOS 17 / macOS 14 (the export's minimum deployment target).

import CoreGraphics
import CoreML
import Foundation

struct LabelTable: Decodable {
    let file: String
    let shape: [Int]  // [N, L, D]
    let prompts: [String]
}

/// Deterministic Gaussian noise (SplitMix64 + Box-Muller), so a seed reproduces an image.
struct GaussianNoise {
    var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func nextUniform() -> Float {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return (Float(z >> 40) + 0.5) / Float(1 << 24)  // (0, 1)
    }
    mutating func next() -> Float {
        let u1 = nextUniform(), u2 = nextUniform()
        return (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
    }
}

final class EmojiGenerator {
    let model: MLModel
    let labels: [String]
    let embeddings: [Float]  // N*L*D, row-major
    let tokens: Int, dim: Int, channels: Int, size: Int

    init(modelURL: URL, labelsFolder: URL, computeUnits: MLComputeUnits = .all) async throws {
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        // A .mlpackage added to an Xcode target is compiled at build time (use its .mlmodelc);
        // a downloaded one is compiled here once.
        let compiled = modelURL.pathExtension == "mlmodelc" ? modelURL : try await MLModel.compileModel(at: modelURL)
        model = try MLModel(contentsOf: compiled, configuration: config)

        let table = try JSONDecoder().decode(LabelTable.self, from: Data(contentsOf: labelsFolder.appendingPathComponent("labels.json")))
        let raw = try Data(contentsOf: labelsFolder.appendingPathComponent(table.file))
        embeddings = raw.withUnsafeBytes { buf in
            buf.bindMemory(to: UInt32.self).map { Float(bitPattern: UInt32(littleEndian: $0)) }
        }
        labels = table.prompts
        tokens = table.shape[1]
        dim = table.shape[2]
        let xShape = model.modelDescription.inputDescriptionsByName["x_t"]!.multiArrayConstraint!.shape.map(\.intValue)
        channels = xShape[1]
        size = xShape[2]
        precondition(embeddings.count == table.shape.reduce(1, *), "label_embeddings.bin does not match labels.json")
    }

    /// Text embedding (L*D floats) of a label; zeros = unconditional.
    func embedding(for label: String) -> [Float]? {
        guard let i = labels.firstIndex(of: label) ?? labels.firstIndex(where: { $0.localizedCaseInsensitiveContains(label) })
        else { return nil }
        let n = tokens * dim
        return Array(embeddings[(i * n)..<((i + 1) * n)])
    }

    /// One CFG velocity evaluation: batch 2 = [x, x] with [text, zeros].
    private func velocity(_ x: [Float], t: Float, text: [Float], guidance: Float) throws -> [Float] {
        let n = x.count
        let xs = try MLMultiArray(shape: [2, channels, size, size].map { NSNumber(value: $0) }, dataType: .float32)
        let ts = try MLMultiArray(shape: [2], dataType: .float32)
        let te = try MLMultiArray(shape: [2, tokens, dim].map { NSNumber(value: $0) }, dataType: .float32)
        xs.withUnsafeMutableBufferPointer(ofType: Float.self) { p, _ in
            for i in 0..<n { p[i] = x[i]; p[n + i] = x[i] }
        }
        ts.withUnsafeMutableBufferPointer(ofType: Float.self) { p, _ in p[0] = t; p[1] = t }
        te.withUnsafeMutableBufferPointer(ofType: Float.self) { p, _ in
            for i in 0..<text.count { p[i] = text[i]; p[text.count + i] = 0 }
        }
        let inputs = try MLDictionaryFeatureProvider(dictionary: ["x_t": xs, "t": ts, "text": te])
        let v = try model.prediction(from: inputs).featureValue(for: "velocity")!.multiArrayValue!
        // Outputs may be padded: read through the strides.
        let s = v.strides.map(\.intValue)
        var out = [Float](repeating: 0, count: n)
        v.withUnsafeBufferPointer(ofType: Float.self) { p in
            var k = 0
            for c in 0..<channels { for h in 0..<size { for w in 0..<size {
                let cond = p[c * s[1] + h * s[2] + w * s[3]]
                let uncond = p[s[0] + c * s[1] + h * s[2] + w * s[3]]
                out[k] = uncond + guidance * (cond - uncond)
                k += 1
            } } }
        }
        return out
    }

    /// noise (t=0) -> image (t=1) with Heun's method and classifier-free guidance.
    func generate(label: String, steps: Int = 20, guidance: Float = 7.5, seed: UInt64 = 0) throws -> CGImage {
        guard let text = embedding(for: label) else { throw CocoaError(.coderValueNotFound) }
        var rng = GaussianNoise(seed: seed)
        var x = (0..<(channels * size * size)).map { _ in rng.next() }
        for i in 0..<steps {
            let t0 = Float(i) / Float(steps), t1 = Float(i + 1) / Float(steps), dt = t1 - t0
            let v0 = try velocity(x, t: t0, text: text, guidance: guidance)
            let xPred = zip(x, v0).map { $0 + dt * $1 }
            let v1 = try velocity(xPred, t: t1, text: text, guidance: guidance)
            for k in 0..<x.count { x[k] += dt * 0.5 * (v0[k] + v1[k]) }
        }
        return makeImage(x)
    }

    /// CHW floats in [-1,1] -> RGBA8 CGImage.
    func makeImage(_ x: [Float]) -> CGImage {
        let plane = size * size
        var rgba = [UInt8](repeating: 255, count: plane * 4)
        for p in 0..<plane {
            for c in 0..<min(channels, 3) {
                let v = (min(max(x[c * plane + p], -1), 1) + 1) * 127.5
                rgba[p * 4 + c] = UInt8(v.rounded())
            }
        }
        let provider = CGDataProvider(data: Data(rgba) as CFData)!
        return CGImage(width: size, height: size, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: size * 4,
                       space: CGColorSpaceCreateDeviceRGB(),
                       bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                       provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)!
    }
}
