/// Splits long answers into parts a platform accepts, at paragraph or line boundaries, avoiding cuts inside
/// fenced code blocks when possible. Nothing is dropped: joining the parts gives back the text.
///
/// A part holds at most `maxCharacters` characters, and at most `maxSize` when each character costs
/// `size(character)` (e.g. its UTF-8 bytes once escaped in JSON, where a platform limits bytes).
public struct TextSplitter: Sendable {
    public var maxCharacters: Int
    public var maxSize: Int?
    public var size: @Sendable (Character) -> Int

    public init(maxCharacters: Int, maxSize: Int? = nil, size: @escaping @Sendable (Character) -> Int = { $0.utf8.count }) {
        precondition(maxCharacters > 0 && (maxSize ?? 1) > 0)
        self.maxCharacters = maxCharacters
        self.maxSize = maxSize
        self.size = size
    }

    public func split(_ text: String) -> [String] {
        var parts: [String] = []
        var rest = Substring(text)
        while true {
            let limit = limitIndex(in: rest)
            if limit == rest.endIndex { break }
            let cut = cutIndex(in: rest, limit: limit)
            parts.append(String(rest[..<cut]))
            rest = rest[cut...]
        }
        if !rest.isEmpty || parts.isEmpty { parts.append(String(rest)) }
        return parts
    }

    /// The longest start of `text` within the limits (cut anywhere, not at a line).
    public func prefix(_ text: String) -> Substring {
        let text = Substring(text)
        return text[..<limitIndex(in: text)]
    }

    /// Where the longest start of `text` within the limits ends (`endIndex` when all of it fits). At least
    /// one character, so a single character over `maxSize` still moves on.
    private func limitIndex(in text: Substring) -> String.Index {
        guard let maxSize else {
            return text.index(text.startIndex, offsetBy: maxCharacters, limitedBy: text.endIndex) ?? text.endIndex
        }
        var index = text.startIndex
        var count = 0
        var used = 0
        while index < text.endIndex, count < maxCharacters {
            used += size(text[index])
            if used > maxSize, count > 0 { break }
            count += 1
            index = text.index(after: index)
        }
        return index
    }

    /// The best place to end the next part before `limit`: after a blank line outside code, else after a
    /// line break outside code, else after any line break, else at the limit.
    private func cutIndex(in text: Substring, limit: String.Index) -> String.Index {
        var paragraphOutside: String.Index?
        var lineOutside: String.Index?
        var lineAny: String.Index?
        var inCode = false
        var lineStart = text.startIndex
        var index = text.startIndex
        var length = 0
        while index < limit {
            let char = text[index]
            let next = text.index(after: index)
            if char == "\n" {
                let line = text[lineStart..<index]
                if line.trimmingPrefixWhitespace().hasPrefix("```") { inCode.toggle() }
                lineAny = next
                if !inCode {
                    lineOutside = next
                    if line.allSatisfy(\.isWhitespace) { paragraphOutside = next }
                }
                lineStart = next
            }
            index = next
            length += 1
        }
        let minimum = length / 4
        func acceptable(_ i: String.Index?) -> String.Index? {
            guard let i, text.distance(from: text.startIndex, to: i) >= minimum else { return nil }
            return i
        }
        return acceptable(paragraphOutside) ?? acceptable(lineOutside) ?? acceptable(lineAny) ?? limit
    }
}

extension Substring {
    fileprivate func trimmingPrefixWhitespace() -> Substring {
        drop(while: { $0 == " " || $0 == "\t" })
    }
}
