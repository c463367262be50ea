/// A cheap, tokenizer-free estimate of how many model tokens a text costs.
///
/// CJK characters cost about one token each; other text about one token per four UTF-8 bytes
/// (English averages ~4 characters per token). The estimate errs on the high side so that a
/// context budget is not overrun.
public enum TokenEstimator {
    public static func estimate(_ text: String) -> Int {
        var wide = 0
        var narrowBytes = 0
        for scalar in text.unicodeScalars {
            switch scalar.value {
            case 0x2E80...0x9FFF, 0xAC00...0xD7AF, 0xF900...0xFAFF, 0xFF00...0xFFEF, 0x20000...0x2FA1F:
                wide += 1
            default:
                narrowBytes += scalar.utf8.count
            }
        }
        return wide + (narrowBytes + 3) / 4
    }

    /// Overhead the chat format adds per message (role markers, separators).
    public static let perMessageOverhead = 4
}
